"""What FP8 would save on the language model's prefill GEMMs (GPU only; sm89+ for FP8).

    python bench/probe_fp8_gemm.py

bf16 ``F.linear`` against ``torch._scaled_mm`` in e4m3 with a scale per row (weights quantised once, activations
per token on the fly, their cost timed apart) for the 8B's four GEMMs of a layer (q/k/v fused, o, gate/up fused,
down) at prefills of 2,048, 4,608 and 18,432 tokens, per 288-token line over 36 layers, and the FP8 result's
error against fp32 (relative norm, random data). Fourteenth session, an H200: the GEMMs 1,354-1,366 TFLOP/s
against bf16's 781-800 (5.0 -> ~2.9 ms a line), but quantising the activations eagerly costs it all back -- a
saving needs the quantisation fused into the kernels before each GEMM, and an accuracy argument (3.7 % error).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import gpu_us

H, INTER, QKV = 4096, 12288, 6144
SHAPES = {"qkv": (H, QKV), "o": (H, H), "gate_up": (H, 2 * INTER), "down": (INTER, H)}  # (in, out)
LINE_TOKENS, LAYERS = 288, 36


def quant_rows(torch, x):
    """e4m3 with one scale per row (amax / 448), the scales in fp32."""
    s = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
    return (x / s).to(torch.float8_e4m3fn), s


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("probe_fp8_gemm: needs a CUDA GPU with FP8 (sm89 or later)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(torch.__version__, torch.cuda.get_device_name())
    for M in (2048, 4608, 18432):
        t_bf16 = t_fp8 = t_quant = 0.0
        errors = []
        for k_in, n_out in SHAPES.values():
            x = torch.randn(M, k_in, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16) * 0.02
            wq, ws = quant_rows(torch, w)
            xq, xs = quant_rows(torch, x)
            t_bf16 += gpu_us(lambda x=x, w=w: torch.nn.functional.linear(x, w)) / 1e3  # ms

            def fp8(xq=xq, xs=xs, wq=wq, ws=ws):
                return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)

            try:
                y = fp8()
            except RuntimeError as exc:
                print(f"torch._scaled_mm fails here: {exc}", file=sys.stderr)
                return 1
            t_fp8 += gpu_us(fp8) / 1e3
            t_quant += gpu_us(lambda x=x: quant_rows(torch, x)) / 1e3
            ref = torch.nn.functional.linear(x.float(), w.float())
            errors.append(float((y.float() - ref).norm() / ref.norm()))
        flops = 2 * M * sum(k * n for k, n in SHAPES.values())
        per_line = LAYERS * LINE_TOKENS / M
        print(f"{M} tokens: a layer's GEMMs bf16 {t_bf16:.3f} ms ({flops / t_bf16 / 1e9:.0f} TFLOP/s), fp8 "
              f"{t_fp8:.3f} ms ({flops / t_fp8 / 1e9:.0f}) + activation quantisation {t_quant:.3f} ms; a "
              f"{LINE_TOKENS}-token line: bf16 {per_line * t_bf16:.2f} ms, fp8 {per_line * t_fp8:.2f} ms "
              f"(+ {per_line * t_quant:.2f} quantising); fp8 error vs fp32 {max(errors):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
