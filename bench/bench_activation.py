"""The MLP's SiLU(gate) x up on a GPU: inductor's compiled op (what the fast generator used) against the Triton
kernel of htrd.activation, at a decode step's rows and at prefills' (16 lines of ~284 tokens), the 8B model's
width. Prints each one's time, its memory rate and the ratio (same run).

    python bench/bench_activation.py [--inter 12288] [--rows 256,4544,8192]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import gpu_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inter", type=int, default=12288)
    ap.add_argument("--rows", default="1,64,256,4544,8192")
    args = ap.parse_args()
    from htrd.activation import reference, silu_mul, silu_mul_ok
    from htrd.fastgen import _ops

    ops = _ops(torch, compile=True)
    dev, dt = torch.device("cuda"), torch.bfloat16
    print("device:", torch.cuda.get_device_name(dev), "| Triton kernel passes its check:",
          silu_mul_ok(inter=args.inter, device=dev, dtype=dt))
    with torch.inference_mode():
        for rows in (1, 2):  # the compiled op's two compilations (static, then dynamic rows), as in htrd
            ops.silu_mul(torch.zeros((rows, 2 * args.inter), dtype=dt, device=dev))
        print(f"{'rows':>6} {'compiled us':>12} {'GB/s':>7} {'triton us':>10} {'GB/s':>7} {'ratio':>6} {'max err':>8}")
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn((rows, 2 * args.inter), dtype=dt, device=dev) * 3
            moved = 3 * rows * args.inter * x.element_size()
            a, b = gpu_us(lambda x=x: ops.silu_mul(x)), gpu_us(lambda x=x: silu_mul(x))
            err = (silu_mul(x).float() - reference(x).float()).abs().max().item()
            print(f"{rows:6d} {a:12.1f} {moved / a / 1e3:7.0f} {b:10.1f} {moved / b / 1e3:7.0f} {a / b:5.2f}x "
                  f"{err:8.4f}")


if __name__ == "__main__":
    main()
