"""The model directory's layout: its names, which variant loads, and how big it is.

One home for what htrctl (provision, verify, doctor) and htrd (the loader,
GPU selection) must agree on::

    <model-dir>/                 base weights, config, processor/tokenizer files
      final_model/               the LoRA adapter       (ADAPTER_DIRNAME)
      merged/                    optional: adapter folded into the base (MERGED_DIRNAME)

``resolve_variant`` decides which of them loads; ``processor_source`` where the
processor/tokenizer comes from (the adapter's own files, saved at training
time, win over the base's); ``model_footprint`` sizes that
variant from the safetensors headers without loading anything -- doctor's
placement and htrd's GPU choice both call it, so they cannot disagree.
No torch here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import ModelMissingError

ADAPTER_DIRNAME = "final_model"
MERGED_DIRNAME = "merged"
VARIANTS = ("auto", "merged", "adapter")
# What a training run saves next to its adapter with tokenizer.save_pretrained / processor.save_pretrained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json")
PROCESSOR_ONLY_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
PROCESSOR_FILES = TOKENIZER_FILES + PROCESSOR_ONLY_FILES + CHAT_TEMPLATE_FILES
_MAX_HEADER = 100 * 1024 * 1024


def has_merged(model_dir: Path) -> bool:
    return (Path(model_dir) / MERGED_DIRNAME / "config.json").is_file()


def has_adapter(model_dir: Path) -> bool:
    return (Path(model_dir) / ADAPTER_DIRNAME / "adapter_config.json").is_file()


def resolve_variant(model_dir: Path, variant: str = "auto") -> str:
    """``merged`` when ``<dir>/merged/config.json`` exists (or is required), else ``adapter``.

    ``model.variant: merged`` without a merged directory is a named error, never a fallback.
    """
    model_dir = Path(model_dir)
    if variant not in VARIANTS:
        raise ValueError(f"model.variant must be one of {VARIANTS}, not {variant!r}")
    if variant == "merged":
        if not has_merged(model_dir):
            raise ModelMissingError(
                f"model.variant is 'merged' but {model_dir / MERGED_DIRNAME}/config.json does not exist",
                remedy="run `htrctl provision --merge`, or set model.variant: auto")
        return "merged"
    if variant == "auto" and has_merged(model_dir):
        return "merged"
    return "adapter"


def processor_source(model_dir: Path) -> tuple[str, Path]:
    """Where the processor comes from: ``("adapter", final_model/)`` when the adapter holds a whole processor
    (``processor_config.json`` or ``preprocessor_config.json`` and a tokenizer), ``("adapter-tokenizer",
    final_model/)`` when it holds a tokenizer only (the image processor then comes from the base), else
    ``("base", model_dir)``. The adapter's files are what training used; they also serve a ``merged/`` variant,
    which was made from that adapter."""
    model_dir = Path(model_dir)
    adapter = model_dir / ADAPTER_DIRNAME
    if not has_adapter(model_dir) or not any((adapter / n).is_file() for n in ("tokenizer.json",
                                                                               "tokenizer_config.json")):
        return "base", model_dir
    if any((adapter / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")):
        return "adapter", adapter
    return "adapter-tokenizer", adapter


def variant_paths(model_dir: Path, variant: str = "auto") -> tuple[str, Path, Path | None]:
    """``(variant, weights_dir, adapter_dir_or_None)`` of what loads for *variant*."""
    model_dir = Path(model_dir)
    used = resolve_variant(model_dir, variant)
    if used == "merged":
        return used, model_dir / MERGED_DIRNAME, None
    return used, model_dir, model_dir / ADAPTER_DIRNAME


def safetensors_payload(path: Path) -> int:
    """Bytes of tensor data in one .safetensors file, from its header (falls back to the file size)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                return 0
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                return path.stat().st_size
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        return max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        try:
            return path.stat().st_size
        except OSError:
            return 0


def weights_bytes(d: Path) -> int:
    """Size of the weights in directory *d*: the index's total_size, else the shards' headers."""
    d = Path(d)
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        try:
            meta = json.loads(idx.read_text(encoding="utf-8")).get("metadata") or {}
            if int(meta.get("total_size") or 0) > 0:
                return int(meta["total_size"])
        except (OSError, ValueError, TypeError):
            pass
    return sum(safetensors_payload(p) for p in sorted(d.glob("*.safetensors")))


def model_footprint(model_dir: Path, variant: str = "auto") -> dict:
    """``{"variant", "weights_bytes", "parts"}`` for the variant the daemon would load.

    An adapter that is merged at load costs its base's bytes (the merge happens in place);
    the adapter's own bytes are counted too, since both sit in memory while it is applied.
    A ``merged`` variant that is asked for but missing is sized as what would load instead
    (the loader raises the named error).
    """
    model_dir = Path(model_dir)
    use_merged = variant == "merged" or (variant == "auto" and has_merged(model_dir))
    if use_merged:
        size = weights_bytes(model_dir / MERGED_DIRNAME)
        return {"variant": "merged", "weights_bytes": size, "parts": {"merged": size}}
    base = weights_bytes(model_dir)
    adapter_dir = model_dir / ADAPTER_DIRNAME
    adapter = weights_bytes(adapter_dir) if adapter_dir.is_dir() else 0
    return {"variant": "adapter", "weights_bytes": base + adapter, "parts": {"base": base, "adapter": adapter}}


def text_config(model_dir: Path, variant: str = "auto") -> dict | None:
    """The language model's part of the loaded variant's ``config.json`` (its ``text_config``, or the whole
    file where it has none); None when it cannot be read."""
    model_dir = Path(model_dir)
    use_merged = variant == "merged" or (variant == "auto" and has_merged(model_dir))
    cfg_path = (model_dir / MERGED_DIRNAME if use_merged else model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    t = (cfg.get("text_config") or cfg) if isinstance(cfg, dict) else None
    return t if isinstance(t, dict) else None


# Of a GPU's memory, kept free beside htrd's KV cache (prefill activations, graphs): the fast generator serves
# the largest of limits.batch_sizes whose cache fits in the rest of the free memory.
KV_RESERVE_FRACTION = 0.10


def slots_that_fit(sizes: list[int], slot_bytes: int, free_bytes: int, total_bytes: int) -> list[int]:
    """The batch sizes among *sizes* whose KV cache (*slot_bytes* a slot) fits in *free_bytes* (the memory free
    once the weights are loaded) less KV_RESERVE_FRACTION of *total_bytes*; the largest is the slots htrd
    serves ([] when not even the smallest fits). htrd sizes its cache so (daemon/fastgen.py), doctor predicts it."""
    budget = free_bytes - int(total_bytes * KV_RESERVE_FRACTION)
    return [b for b in sorted(sizes) if b * slot_bytes <= budget]


def kv_cache_bytes(model_dir: Path, variant: str, *, slots: int, max_cache_len: int, dtype_bytes: int = 2,
                   length_bucket: int = 64) -> int:
    """Bytes of the fast generator's KV cache: slots x positions x (2 x layers x KV heads x head size), from the
    loaded variant's ``config.json`` (0 when it cannot be read). htrd allocates exactly this (daemon/fastgen.py)."""
    t = text_config(model_dir, variant)
    if t is None:
        return 0
    try:
        heads = int(t["num_attention_heads"])
        head_dim = int(t.get("head_dim") or int(t["hidden_size"]) // heads)
        per_pos = 2 * int(t["num_hidden_layers"]) * int(t.get("num_key_value_heads") or heads) * head_dim * dtype_bytes
    except (ValueError, KeyError, TypeError):
        return 0
    positions = -(-int(max_cache_len) // length_bucket) * length_bucket
    return int(slots) * positions * per_pos
