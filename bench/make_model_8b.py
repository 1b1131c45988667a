"""Write a Qwen3-VL-8B-shaped model with random weights, laid out like a provisioned model directory.

    python bench/make_model_8b.py DEST            # on a GPU host: ~17.5 GB bf16, ~20-40 s
    python bench/make_model_8b.py DEST --tiny     # same layout, tiny shapes, on the CPU (tests the script)

The layout is the demo model's (and the incident's): base weights as
safetensors shards at the root, the tokenizer, processor and chat template, and
a PEFT LoRA adapter (r=16, every linear layer of the language model, non-zero
random B so it changes outputs) in ``final_model/``. The config, processor,
generation config and adapter come from the demo model's own code
(``htrctl/demo_model.py``) with ``QWEN3_VL_8B_SHAPE``, the sizes of
Qwen3-VL-8B-Instruct (text: 36 layers, hidden 4096, MLP 12288, 32 query / 8 KV
heads of 128, vocabulary 151936, interleaved M-RoPE [24, 20, 20], theta 5e6;
vision: depth 27, hidden 1152, MLP 4304, 16 heads, patch 16, merge 2, deepstack
layers 8/16/24); the image processor uses Qwen3-VL's real pixel bounds, so a
1200x160 text line becomes 190 image tokens. The tokenizer is the demo model's
(a small byte-level BPE), with the config's special-token ids matching it.

The model is built directly on the GPU in bf16 (no CPU initialisation). The
weights are random: outputs are noise, but every matmul, cache and kernel has
the real model's shape -- what the benchmark measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("make_model_8b")


def shape(tiny: bool):
    """Qwen3-VL-8B-Instruct's sizes, or (--tiny) the same layout small enough for a CPU."""
    from htrctl.demo_model import QWEN3_VL_8B_SHAPE

    if not tiny:
        return QWEN3_VL_8B_SHAPE
    return dataclasses.replace(
        QWEN3_VL_8B_SHAPE, vocab_size=151936 // 64, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, mrope_section=(6, 5, 5), vision_depth=3,
        vision_hidden_size=64, vision_intermediate_size=128, vision_num_heads=2, deepstack_visual_indexes=(0, 1),
    )


def build(dest: Path, *, tiny: bool = False, device: str | None = None, seed: int = 0) -> dict:
    """Write the model directory *dest* (replacing it). Returns timings and sizes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    from htrctl.demo_model import (
        build_processor,
        build_tokenizer,
        generation_config,
        lora_config,
        qwen3vl_config,
        save_adapter,
        special_token_ids,
    )
    from htrctl.modeldir import ADAPTER_DIRNAME

    t0 = time.perf_counter()
    device = device or ("cpu" if tiny else "cuda")
    dest = Path(dest)
    sizes = shape(tiny)
    work = Path(tempfile.mkdtemp(prefix=".make-model-", dir=dest.parent if dest.parent.exists() else None))
    try:
        tokenizer = build_tokenizer()
        ids = special_token_ids(tokenizer)
        config = qwen3vl_config(sizes, ids)

        dtype = torch.bfloat16
        torch.manual_seed(seed)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen3VLForConditionalGeneration(config)  # weights initialised on the device
        finally:
            torch.set_default_dtype(prev)
        model = model.to(dtype).eval()
        n_params = sum(p.numel() for p in model.parameters())
        t_built = time.perf_counter()

        out = work / "model"
        model.generation_config = generation_config(ids)
        model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
        t_saved = time.perf_counter()
        build_processor(tokenizer, sizes).save_pretrained(out)

        peft_model = get_peft_model(model, lora_config(sizes))
        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(seed + 1)
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:  # non-zero B: the adapter changes outputs
                    p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
        save_adapter(peft_model, out / ADAPTER_DIRNAME)
        del peft_model, model
        t_adapter = time.perf_counter()

        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    report = {
        "dest": str(dest),
        "params": n_params,
        "bytes": size,
        "build_s": round(t_built - t0, 2),
        "save_s": round(t_saved - t_built, 2),
        "adapter_s": round(t_adapter - t_saved, 2),
        "total_s": round(time.perf_counter() - t0, 2),
    }
    logger.info("wrote %s: %.2f B parameters, %.2f GB in %.1f s", dest, n_params / 1e9, size / 1e9, report["total_s"])
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path, help="directory to write (replaced if it exists)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, to test this script")
    ap.add_argument("--device", default=None, help="where to build (default: cuda, or cpu with --tiny)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    report = build(args.dest, tiny=args.tiny, device=args.device, seed=args.seed)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
