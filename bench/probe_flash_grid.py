"""Does flash attention's variable-length kernel pay for a max_seqlen far above its sequences? (GPU only.)

    python bench/probe_flash_grid.py

Its grid has a row of thread blocks per 128 positions of max_seqlen for every sequence and head, and those past a
sequence's end only return. Times the call told the padded row count against shorter bounds on the same inputs
(outputs compared: identical) for the shapes htrd meets under load -- the vision tower's padded patches
(htrd.vision.VISION_SPAN) and the language model's packed prompts. Fourteenth session, an H200: vision 16 x 760
patches 253 us told 12,288, 226 us told 4,096; the language model's 16 x 283 tokens the same told 1,024 or 320.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import gpu_us


def case(torch, name: str, lens: list[int], heads: int, kv_heads: int, d: int, causal: bool, bounds: list[int],
         pad_to: int) -> None:
    """Sequences of *lens* then one padding sequence up to *pad_to* rows, told each max_seqlen of *bounds*."""
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    cu += [pad_to, pad_to]
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    q = torch.randn(pad_to, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(pad_to, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(pad_to, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    ref = None
    for m in bounds:
        def call(m=m):
            return torch.ops.aten._flash_attention_forward(q, k, v, cu_t, cu_t, m, m, 0.0, causal, False,
                                                           scale=d**-0.5)[0]
        out = call()
        ref = out if ref is None else ref
        print(f"{name}: max_seqlen {m:6d}: {gpu_us(call):8.1f} us  same output: {torch.equal(out, ref)}",
              flush=True)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("probe_flash_grid: needs a CUDA GPU (flash attention's kernel)", file=sys.stderr)
        return 2
    # the vision tower under 256 clients: 16 lines of 760 patches, 16 heads of 72
    case(torch, "vision 16 x 760", [760] * 16, 16, 16, 72, False, [12288, 4096, 2048, 1024], 12288)
    case(torch, "vision 7 mixed", [190, 400, 760, 1000, 1250, 500, 300], 16, 16, 72, False, [4608, 2048, 1280], 4608)
    # the language model's packed prefill: 16 lines of 283 tokens, 32 query / 8 KV heads of 128, causal
    case(torch, "lm 16 x 283", [283] * 16, 32, 8, 128, True, [1024, 512, 384, 320], 4608)
    return 0


if __name__ == "__main__":
    sys.exit(main())
