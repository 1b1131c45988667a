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

from .errors import ModelError, require
from .manifest import ADAPTER_DIRNAME, MERGED_DIRNAME

logger = logging.getLogger(__name__)

_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
KEEP = ("config.json", "generation_config.json")


def load_base_and_adapter(root: Path, *, dtype: str | None = None):
    """The base model from *root* and its adapter from ``final_model/`` (PeftModel), on CPU, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = require("torch", "model", "merging the adapter")
    transformers = require("transformers", "model", "merging the adapter")
    peft = require("peft", "model", "merging the adapter")
    from .verify import load_weight_set, read_config, weights_dtype

    config = read_config(root) or {}
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ModelError(f"{root}/config.json: architecture {archs!r} is not in transformers",
                         remedy="upgrade transformers ('model' extra) or check the base")
    if dtype is None:
        ws, _ = load_weight_set(root)
        dtype = _DTYPES.get(weights_dtype(ws) or "", "float32") if ws else "float32"
    model = cls.from_pretrained(root, dtype=getattr(torch, dtype), local_files_only=True, use_safetensors=True,
                                device_map=None)
    model.eval()
    peft_model = peft.PeftModel.from_pretrained(model, root / ADAPTER_DIRNAME, is_trainable=False,
                                                local_files_only=True)
    return peft_model, dtype


def merge_adapter(root: Path, *, progress: bool = False, max_shard_size: str = "5GB") -> dict[str, Any]:
    """Write ``root/merged/`` (atomically, via a temp dir); returns the manifest's variant record."""
    root = Path(root)
    peft_model, dtype = load_base_and_adapter(root)
    logger.info("merging %s into the base (%s)", ADAPTER_DIRNAME, dtype)
    merged = peft_model.merge_and_unload()
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
