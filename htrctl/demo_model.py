"""Build the tiny, deterministic Qwen3-VL demo model.

The directory it writes is laid out exactly like the incident's model
directory (DESIGN.md): base files at the root, a PEFT LoRA adapter in
``final_model/`` whose ``adapter_config.json`` names the base by its hub id
``Qwen/Qwen3-VL-8B-Instruct`` -- the trap ``htrctl provision`` must catch.

Every piece is real: a byte-level BPE tokenizer trained here on Latin and
Glagolitic text with Qwen's special tokens, the Qwen3-VL image processor and
processor, a chat template, random weights saved as safetensors, and a LoRA
adapter written by PEFT. Building twice gives byte-identical files.

Needs the ``model`` extra (torch, transformers, peft); imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .modeldir import ADAPTER_DIRNAME

logger = logging.getLogger(__name__)

HUB_BASE_ID = "Qwen/Qwen3-VL-8B-Instruct"
DEMO_SEED = 20261127
DEMO_VERSION = "2"  # bump when the builder's output changes

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen3-VL's chat template, reduced to what transcription uses (text and image
# parts; system/user/assistant turns; the generation prompt).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LATIN = (
    "In principio erat verbum et verbum erat apud deum et deus erat verbum. "
    "Hoc erat in principio apud deum. Omnia per ipsum facta sunt et sine ipso factum est nihil. "
    "Pater noster qui es in caelis sanctificetur nomen tuum adveniat regnum tuum. "
    "Anno domini millesimo quadringentesimo octavo scriptum est hoc missale glagoliticum. "
)


def _corpus() -> list[str]:
    """Latin lines and Glagolitic lines (U+2C00..U+2C5F), fixed for determinism."""
    glag = [chr(c) for c in range(0x2C00, 0x2C60)]
    lines = [s.strip() + "." for s in _LATIN.split(".") if s.strip()]
    # Glagolitic "words": deterministic walks over the block, so every letter
    # and many bigrams are present for the BPE trainer.
    for i in range(200):
        words = []
        for j in range(8):
            n = 2 + (i * 7 + j * 3) % 6
            words.append("".join(glag[(i * 13 + j * 29 + k * 5) % len(glag)] for k in range(n)))
        lines.append(" ".join(words))
    lines.append("".join(glag))
    lines.append("0123456789 .,;:!?-'\"()[]")
    return lines


def _build_tokenizer(out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Qwen2's pre-tokenization: its split regex, then byte-level.
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    hf_tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
    )
    hf_tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    hf_tok.add_tokens(["<|endoftext|>"], special_tokens=True)
    return hf_tok


def _write_tree(out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    torch.manual_seed(DEMO_SEED)
    tokenizer = _build_tokenizer(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    vocab_size += (-vocab_size) % 64  # pad like real checkpoints do

    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        dtype="float32",
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=144,
        deepstack_visual_indexes=[0],
    )
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(DEMO_SEED)
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True, max_shard_size="400KB")

    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 24},
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)

    # The LoRA adapter, written by PEFT, with non-zero B so it changes outputs.
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(DEMO_SEED + 1)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        g = torch.Generator().manual_seed(DEMO_SEED + 1)
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter_dir = out / ADAPTER_DIRNAME
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    cfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = HUB_BASE_ID  # the incident's trap
    acfg.pop("revision", None)
    acfg["target_modules"] = sorted(acfg["target_modules"])  # PEFT stores a set
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.unlink()  # PEFT's model card embeds versions; not part of the model
    _normalise_json(out)


def _normalise_json(root: Path) -> None:
    """Rewrite JSON files with sorted keys so bytes do not depend on dict order."""
    for path in sorted(root.rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def build_demo_model(dest: Path, *, force: bool = False) -> Path:
    """Write the demo model to *dest* (atomically) and return it.

    An existing build of the same ``DEMO_VERSION`` is reused unless *force*.
    """
    dest = Path(dest)
    stamp = dest / ".htr-demo-version"
    if not force and stamp.is_file() and stamp.read_text().strip() == DEMO_VERSION:
        return dest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dest.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builders (parallel test runs) wait
        if not force and stamp.is_file() and stamp.read_text().strip() == DEMO_VERSION:
            return dest
        _build_into(dest)
    logger.info("demo model written to %s", dest)
    return dest


def _build_into(dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=dest.parent))
    try:
        tmp.chmod(0o755)
        _write_tree(tmp)
        (tmp / ".htr-demo-version").write_text(DEMO_VERSION + "\n")
        # safetensors writes 0600 files: make the tree readable by a service user
        # (htr), as a model directory copied by an administrator would be.
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        if dest.exists():
            old = dest.with_name(dest.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
