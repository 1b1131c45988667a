"""A stand-in for nvidia-ml-py's pynvml with the real signatures and quirks (for CPU tests of
htrctl.nvml's real backend only): NVML_P2P_CAPS_INDEX_READ is a one-element tuple as upstream,
and a non-int caps index fails like ctypes does; MIG and NVLink raise NotSupported as on PCIe boards."""
# ruff: noqa
class NVMLError(Exception): pass
class NVMLError_NotSupported(NVMLError): pass
NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1; NVML_VOLATILE_ECC=0; NVML_AGGREGATE_ECC=1; NVML_NVLINK_MAX_LINKS=18
NVML_P2P_CAPS_INDEX_READ=(0,)
def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlSystemGetDriverVersion(): return "550.1"
def nvmlSystemGetCudaDriverVersion(): return 12040
def nvmlSystemGetNVMLVersion(): return b"12.550"
def nvmlDeviceGetCount(): return 2
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetUUID(h): return f"GPU-0000000{h}-1111-2222-3333-444444444444"
def nvmlDeviceGetName(h): return b"NVIDIA L40S"
class Pci: 
    def __init__(s,h): s.busId=f"00000000:{0x41+h*0x40:02X}:00.0"
def nvmlDeviceGetPciInfo(h): return Pci(h)
class Mem:
    total=48<<30; free=47<<30; used=1<<30
def nvmlDeviceGetMemoryInfo(h): return Mem()
def nvmlDeviceGetPersistenceMode(h): return 1
def nvmlDeviceGetComputeMode(h): return 0
def nvmlDeviceGetMigMode(h): raise NVMLError_NotSupported("Not Supported")
def nvmlDeviceGetEccMode(h): return [1,1]
def nvmlDeviceGetTotalEccErrors(h,a,b): return 0
def nvmlDeviceGetRemappedRows(h): return (0,0,0,0)
class P: pid=123; usedGpuMemory=None
def nvmlDeviceGetComputeRunningProcesses(h): return [P()] if h else []
def nvmlDeviceGetCurrPcieLinkGeneration(h): return 4
def nvmlDeviceGetCurrPcieLinkWidth(h): return 16
def nvmlDeviceGetNvLinkState(h,l): raise NVMLError_NotSupported("Not Supported")
def nvmlDeviceGetNumaNodeId(h): return 0
def nvmlDeviceGetMinorNumber(h): return h
def nvmlDeviceGetTopologyCommonAncestor(a,b): return 30
def nvmlDeviceGetP2PStatus(a,b,i):
    if not isinstance(i,int): raise TypeError("Don't know how to convert parameter 3")
    return 0 if i in (0,1) else 5
