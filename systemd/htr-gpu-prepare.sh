#!/bin/sh
# htr-gpu-prepare -- load the NVIDIA kernel modules and create the device nodes
# CUDA opens (/dev/nvidiactl, /dev/nvidiaN per GPU, /dev/nvidia-uvm), as root,
# before htr.service / htr@*.service start (run by htr-gpu-prepare.service).
#
# htrd's sandbox cannot do this itself: NoNewPrivileges= and
# ProtectKernelModules= stop the set-uid nvidia-modprobe that libcuda runs to
# load nvidia-uvm on demand, and DeviceAllow=char-nvidia* is resolved against
# /proc/devices when the unit starts. With nvidia-modprobe (the driver's own
# helper) it does what libcuda would; without it, what NVIDIA's installation
# guide documents ("Device Node Verification"): modprobe + mknod.
#
# Nothing to do (exit 0) on a host without an NVIDIA PCI device. SYSFS, PROCFS
# and DEVFS (default /sys, /proc, /dev) exist for the tests only.
set -eu
SYSFS=${SYSFS:-/sys}
PROCFS=${PROCFS:-/proc}
DEVFS=${DEVFS:-/dev}

found=
for v in "$SYSFS"/bus/pci/devices/*/vendor; do
    [ -r "$v" ] && [ "$(cat "$v")" = 0x10de ] && found=1 && break
done
if [ -z "$found" ]; then
    echo "htr-gpu-prepare: no NVIDIA PCI device on this host: nothing to prepare"
    exit 0
fi

if command -v nvidia-modprobe >/dev/null 2>&1; then
    have_nvm=1
else
    have_nvm=
    echo "htr-gpu-prepare: nvidia-modprobe not found: modprobe + mknod instead"
fi

# nvidia.ko and /dev/nvidiactl (minor 255)
if [ -n "$have_nvm" ]; then
    nvidia-modprobe -c 255
else
    modprobe nvidia
    [ -e "$DEVFS/nvidiactl" ] || mknod -m 666 "$DEVFS/nvidiactl" c 195 255
fi

# /dev/nvidiaN for every GPU the driver knows, N from its "Device Minor:"
n=0
for info in "$PROCFS"/driver/nvidia/gpus/*/information; do
    [ -r "$info" ] || continue
    minor=$(sed -n 's/^Device Minor:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$info")
    [ -n "$minor" ] || continue
    if [ -n "$have_nvm" ]; then
        nvidia-modprobe -c "$minor"
    else
        [ -e "$DEVFS/nvidia$minor" ] || mknod -m 666 "$DEVFS/nvidia$minor" c 195 "$minor"
    fi
    n=$((n + 1))
done

# nvidia-uvm.ko and /dev/nvidia-uvm (minor 0 of its own major)
if [ -n "$have_nvm" ]; then
    nvidia-modprobe -u -c 0
else
    modprobe nvidia-uvm
    major=
    while read -r num name; do
        [ "$name" = nvidia-uvm ] && major=$num
    done < "$PROCFS/devices"
    if [ -z "$major" ]; then
        echo "htr-gpu-prepare: nvidia-uvm is not in $PROCFS/devices after modprobe" >&2
        exit 1
    fi
    [ -e "$DEVFS/nvidia-uvm" ] || mknod -m 666 "$DEVFS/nvidia-uvm" c "$major" 0
fi
echo "htr-gpu-prepare: nvidia and nvidia-uvm loaded; nodes for $n GPU(s), nvidiactl and nvidia-uvm present"
