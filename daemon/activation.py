"""The language model's MLP activation, SiLU(gate) x up, as one Triton kernel where it runs.

The fast generator computes gate and up in one GEMM (rows x 2 * intermediate); this takes that output and
writes rows x intermediate: each element read once and written once, in fp32 inside, rounded once (as
inductor's fused kernel rounds). inductor's kernel for it (``_Ops.silu_mul``, dynamic row count) was the
third-largest kernel at 256 clients on an H200 (torch.profiler, bench/trace_htrd); alone, at the 8B model's
width (bench/bench_activation.py), a decode step's 256 rows took 53 us against this kernel's 22, a 16-line
prefill's 4,544 rows 136 us (2.5 TB/s) against 83 (4.0 TB/s): ~1.1 ms less a decode step over 36 layers.
Where Triton does not run, or the kernel fails its start-up check against PyTorch (:func:`silu_mul_ok`), the
fast generator keeps the compiled op.
Nothing here imports torch or triton at module level.
"""

from __future__ import annotations

import functools

from .attention import has_triton, kernel_agrees

BLOCK = 1024  # columns of one program


@functools.cache
def _kernel():
    """The Triton kernel, compiled on first use; None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def silu_mul_kernel(GU, Out, inter, stride_gu, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < inter
        g = tl.load(GU + row * stride_gu + cols, mask=keep, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + inter + cols, mask=keep, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(Out + row * stride_out + cols, out.to(Out.dtype.element_ty), mask=keep)

    return silu_mul_kernel


def silu_mul(gu):
    """SiLU of the first half of *gu*'s columns times the second half: (rows, 2 * inter) -> (rows, inter)."""
    import torch

    rows, two = gu.shape
    inter = two // 2
    if gu.stride(1) != 1:
        gu = gu.contiguous()
    out = torch.empty((rows, inter), dtype=gu.dtype, device=gu.device)
    if rows:
        _kernel()[(rows, -(-inter // BLOCK))](gu, out, inter, gu.stride(0), out.stride(0), BLOCK=BLOCK)
    return out


def reference(gu):
    """PyTorch's SiLU(gate) x up in fp32, rounded once to *gu*'s dtype (what :func:`silu_mul` computes)."""
    import torch

    g, u = gu.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(gu.dtype)


def silu_mul_ok(*, inter: int, device, dtype) -> bool:
    """Whether the fast generator may use :func:`silu_mul` here: Triton runs and the kernel gives PyTorch's
    result on random rows (ragged: a row count and width that are not multiples of anything). Logged when not
    (:func:`htrd.attention.kernel_agrees`, the attention kernels' check)."""
    import torch

    if not has_triton(device, dtype):
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    gu = (torch.randn((37, 2 * inter), generator=gen) * 3).to(device=device, dtype=dtype)
    return kernel_agrees(lambda: silu_mul(gu), reference(gu).float(), what="the Triton SiLU x up kernel",
                         fallback="the compiled op instead", against="PyTorch's")
