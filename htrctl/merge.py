"""``provision --merge``: fold the LoRA adapter into the base weights (PEFT ``merge_and_unload``).

Writes ``<dir>/merged/``: ``config.json``, ``generation_config.json`` and
``model*.safetensors`` (+ index) of the merged model, in the base's dtype. The
processor/tokenizer files stay at ``<dir>/``. The daemon can then load the
merged weights without PEFT (faster decoding: no extra LoRA matmuls).

Needs the ``model`` extra (torch, transformers, peft); everything is loaded
from local files only, on CPU, never with remote code. Peak memory is about
the size of the base weights.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import require
from .modeldir import ADAPTER_DIRNAME, MERGED_DIRNAME

logger = logging.getLogger(__name__)

_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
KEEP = ("config.json", "generation_config.json")


def load_base_and_adapter(root: Path, *, dtype: str | None = None, merge: bool = False):
    """The base model from *root* with its adapter from ``final_model/``, on CPU, offline, through htrd's one
    loader (:func:`htrd.model.load_model`); a PeftModel, or the merged model with *merge*. Returns
    ``(model, dtype_name)``; *dtype* defaults to the base weights' own."""
    require("torch", "model", "merging the adapter")
    require("transformers", "model", "merging the adapter")
    require("peft", "model", "merging the adapter")
    from htrd.model import load_model

    from .verify import load_weight_set, weights_dtype

    if dtype is None:
        ws, _ = load_weight_set(root)
        dtype = _DTYPES.get(weights_dtype(ws) or "", "float32") if ws else "float32"
    loaded = load_model(root, device="cpu", dtype=dtype, variant="adapter", merge=merge)
    return loaded.model, dtype


def merge_adapter(root: Path, *, progress: bool = False, max_shard_size: str = "5GB") -> dict[str, Any]:
    """Write ``root/merged/`` (atomically, via a temp dir); returns the manifest's variant record."""
    root = Path(root)
    logger.info("merging %s into the base", ADAPTER_DIRNAME)
    merged, dtype = load_base_and_adapter(root, merge=True)
    out = root / MERGED_DIRNAME
    tmp = root / f".{MERGED_DIRNAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    for p in tmp.iterdir():  # only the weights and configs: the processor stays at <dir>/
        if not (p.name in KEEP or p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json"):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return {"path": MERGED_DIRNAME, "dtype": dtype, "method": "peft.merge_and_unload"}
