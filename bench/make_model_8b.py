"""Write a Qwen3-VL-8B-shaped model with random weights, laid out like a provisioned model directory.

    python bench/make_model_8b.py DEST            # on a GPU host: ~17.5 GB bf16, ~20-40 s
    python bench/make_model_8b.py DEST --tiny     # same layout, tiny shapes, on the CPU (tests the script)

The layout is the demo model's (and the incident's): base weights as
safetensors shards at the root, the tokenizer, processor and chat template, and
a PEFT LoRA adapter (r=16, every linear layer of the language model, non-zero
random B so it changes outputs) in ``final_model/``. Shapes are those of
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
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("make_model_8b")

REAL_IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}  # Qwen3-VL preprocessor_config.json
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shapes(tiny: bool) -> tuple[dict, dict]:
    if tiny:
        text = dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=151936 // 64,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=3,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[0, 1],
        )
    else:
        text = dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=4096,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        )
    text.update(
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attention_bias=False,
        dtype="bfloat16",
    )
    vision.update(
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        hidden_act="gelu_pytorch_tanh",
    )
    return text, vision


def build(dest: Path, *, tiny: bool = False, device: str | None = None, seed: int = 0) -> dict:
    """Write the model directory *dest* (replacing it). Returns timings and sizes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoProcessor,
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    from htrctl.demo_model import HUB_BASE_ID, build_demo_model

    t0 = time.perf_counter()
    device = device or ("cpu" if tiny else "cuda")
    dest = Path(dest)
    work = Path(tempfile.mkdtemp(prefix=".make-model-", dir=dest.parent if dest.parent.exists() else None))
    try:
        demo = build_demo_model(work / "demo")
        demo_proc = AutoProcessor.from_pretrained(demo, local_files_only=True)
        demo_cfg = json.loads((demo / "config.json").read_text())
        tok = demo_proc.tokenizer
        gen_cfg = GenerationConfig.from_pretrained(demo, local_files_only=True)

        text, vision = shapes(tiny)
        text.update(
            pad_token_id=demo_cfg["text_config"].get("pad_token_id"),
            bos_token_id=demo_cfg["text_config"].get("bos_token_id"),
            eos_token_id=demo_cfg["text_config"].get("eos_token_id"),
        )
        config = Qwen3VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=demo_cfg["image_token_id"],
            video_token_id=demo_cfg["video_token_id"],
            vision_start_token_id=demo_cfg["vision_start_token_id"],
            vision_end_token_id=demo_cfg["vision_end_token_id"],
            tie_word_embeddings=False,
        )
        config.architectures = ["Qwen3VLForConditionalGeneration"]

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
        model.generation_config = gen_cfg
        model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
        t_saved = time.perf_counter()

        image_processor = Qwen2VLImageProcessor(
            patch_size=16,
            temporal_patch_size=2,
            merge_size=2,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            size=dict(REAL_IMAGE_SIZE),
        )
        processor = Qwen3VLProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=demo_proc.video_processor,
            chat_template=demo_proc.chat_template,
        )
        processor.save_pretrained(out)

        lora = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(seed + 1)
            for name, p in peft_model.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
        adapter_dir = out / "final_model"
        peft_model.save_pretrained(adapter_dir, safe_serialization=True)
        acfg_path = adapter_dir / "adapter_config.json"
        acfg = json.loads(acfg_path.read_text())
        acfg["base_model_name_or_path"] = HUB_BASE_ID  # like the incident's adapter
        acfg["target_modules"] = sorted(acfg["target_modules"])
        acfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
        (adapter_dir / "README.md").unlink(missing_ok=True)
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
