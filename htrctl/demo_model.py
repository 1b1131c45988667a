"""Build the tiny, deterministic Qwen3-VL demo model.

The directory it writes is laid out exactly like the incident's model
directory (DESIGN.md): base files at the root, a PEFT LoRA adapter in
``final_model/`` whose ``adapter_config.json`` names the base by its hub id
``Qwen/Qwen3-VL-8B-Instruct`` -- the trap ``htrctl provision`` must catch.

Every piece is real: a byte-level BPE tokenizer trained here on Latin and
Glagolitic text with Qwen's special tokens, the Qwen3-VL image processor and
processor, a chat template, random weights saved as safetensors, and a LoRA
adapter written by PEFT. Building twice gives byte-identical files.

The config, processor, generation config and LoRA settings are built by the
functions below from a :class:`ModelShape`: ``DEMO_SHAPE`` here, and
``QWEN3_VL_8B_SHAPE`` (Qwen3-VL-8B-Instruct's sizes) for the benchmarks' 8B-shaped
model (``bench/make_model_8b.py``) -- the same code, two parameter sets.

Needs the ``model`` extra (torch, transformers, peft); imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
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
# The adapter's target modules: every linear layer of the language model.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen3-VL model, its image processor's pixel bounds and its LoRA adapter's rank: all that
    tells the demo model from the 8B one. The rest is the same code (:func:`qwen3vl_config`, ...)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    dtype: str
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_heads: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    pixels: tuple[int, int]  # the image processor's shortest_edge and longest_edge (pixels, not sides)
    lora_r: int
    lora_alpha: int
    vocab_size: int | None = None  # None: the tokenizer's size, padded to a multiple of 64


DEMO_SHAPE = ModelShape(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, mrope_section=(2, 3, 3), max_position_embeddings=4096, dtype="float32",
    vision_depth=2, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2,
    num_position_embeddings=144, deepstack_visual_indexes=(0,), pixels=(32 * 32, 32 * 32 * 24),
    lora_r=4, lora_alpha=8,
)
# Qwen3-VL-8B-Instruct (its config.json and preprocessor_config.json); a 1200x160 line is 190 image tokens.
QWEN3_VL_8B_SHAPE = ModelShape(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, mrope_section=(24, 20, 20),
    max_position_embeddings=262144, dtype="bfloat16", vision_depth=27, vision_hidden_size=1152,
    vision_intermediate_size=4304, vision_num_heads=16, num_position_embeddings=2304,
    deepstack_visual_indexes=(8, 16, 24), pixels=(65536, 16777216), lora_r=16, lora_alpha=32,
)

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


def build_tokenizer():
    """The demo's byte-level BPE with Qwen's special tokens (deterministic; the 8B-shaped model has it too)."""
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
    from peft import get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(DEMO_SEED)
    tokenizer = build_tokenizer()
    ids = special_token_ids(tokenizer)
    config = qwen3vl_config(DEMO_SHAPE, ids, padded_vocab_size(tokenizer))
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(DEMO_SEED)
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    model.generation_config = generation_config(ids)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="400KB")
    build_processor(tokenizer, DEMO_SHAPE).save_pretrained(out)

    # The LoRA adapter, written by PEFT, with non-zero B so it changes outputs.
    torch.manual_seed(DEMO_SEED + 1)
    peft_model = get_peft_model(model, lora_config(DEMO_SHAPE))
    with torch.no_grad():
        g = torch.Generator().manual_seed(DEMO_SEED + 1)
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(peft_model, out / ADAPTER_DIRNAME)
    _normalise_json(out)


def special_token_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def padded_vocab_size(tokenizer) -> int:
    """The tokenizer's size padded to a multiple of 64, as real checkpoints pad their embeddings."""
    return len(tokenizer) + (-len(tokenizer)) % 64


def qwen3vl_config(shape: ModelShape, ids: dict[str, int], vocab_size: int | None = None):
    """A ``Qwen3VLConfig`` of *shape*, with the special-token ids *ids* (:func:`special_token_ids`).
    *vocab_size*: the shape's own when it has one, else this."""
    from transformers import Qwen3VLConfig

    text_config = dict(
        vocab_size=shape.vocab_size or vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": list(shape.mrope_section),
            "mrope_interleaved": True,
        },
        dtype=shape.dtype,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    vision_config = dict(
        depth=shape.vision_depth,
        hidden_size=shape.vision_hidden_size,
        intermediate_size=shape.vision_intermediate_size,
        num_heads=shape.vision_num_heads,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=shape.hidden_size,  # the vision tower's output feeds the language model
        num_position_embeddings=shape.num_position_embeddings,
        deepstack_visual_indexes=list(shape.deepstack_visual_indexes),
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
    return config


def generation_config(ids: dict[str, int]):
    """Greedy; stops at ``<|im_end|>`` or ``<|endoftext|>``."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )


def build_processor(tokenizer, shape: ModelShape):
    """Qwen3-VL's processor: the image processor with *shape*'s pixel bounds, the video processor, the chat
    template."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                  image_std=[0.5, 0.5, 0.5])
    image_processor = Qwen2VLImageProcessor(
        **common, size={"shortest_edge": shape.pixels[0], "longest_edge": shape.pixels[1]}
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**common),
        chat_template=CHAT_TEMPLATE,
    )


def lora_config(shape: ModelShape):
    """The adapter's PEFT config: rank and alpha of *shape*, every linear layer of the language model."""
    from peft import LoraConfig

    return LoraConfig(
        r=shape.lora_r,
        lora_alpha=shape.lora_alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )


def save_adapter(peft_model, adapter_dir: Path) -> None:
    """Write the adapter as the incident's was: its config names the base by hub id."""
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    cfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = HUB_BASE_ID  # the incident's trap
    acfg.pop("revision", None)
    acfg["target_modules"] = sorted(acfg["target_modules"])  # PEFT stores a set
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card embeds versions: not the model


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
