"""``htrctl verify``: is a model directory complete, intact and self-consistent?

Against ``htr-manifest.json``: missing, extra, truncated and modified files.
Without reading tensors: safetensors headers parse and their offsets fit the
file (a hostile header length is rejected before anything is allocated), every
index maps every tensor to an existing shard that holds it, the LoRA adapter in
``final_model/`` fits the base (architecture, target modules, tensor shapes),
and no path escapes the directory (``..``, absolute paths, symlinks pointing
outside). ``quick=True`` skips the full sha256 (sizes, headers and structure
only: what the daemon runs at start). A directory without a manifest gets the
structural checks and a warning that says how to create one.

Library use (the daemon)::

    report = verify_model_dir(path, quick=True)
    report.raise_for_problems()      # ModelMissingError / ModelCorruptError naming the file and remedy
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelCorruptError, ModelMissingError
from .manifest import (
    MANIFEST_NAME,
    ManifestFormatError,
    hash_files,
    read_manifest,
    unsafe_relpath,
    walk_files,
)
from .modeldir import ADAPTER_DIRNAME, MERGED_DIRNAME, PROCESSOR_FILES

logger = logging.getLogger(__name__)

# The safetensors reference implementation refuses headers above 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
SUB_BYTE = {"F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75}

ERROR = "error"
WARNING = "warning"
INFO = "info"
# Finding codes (stable, for --json consumers).
MISSING_CODES = {"not_found", "missing", "base_missing", "no_weights", "index_missing_shard"}


@dataclass
class Finding:
    path: str
    problem: str
    remedy: str
    code: str
    severity: str = ERROR

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "code": self.code, "severity": self.severity,
                "problem": self.problem, "remedy": self.remedy}


@dataclass
class VerifyReport:
    path: str
    quick: bool
    findings: list[Finding] = field(default_factory=list)
    manifest_digest: str | None = None
    files_checked: int = 0
    bytes_hashed: int = 0

    @property
    def ok(self) -> bool:
        return not any(f.severity == ERROR for f in self.findings)

    @property
    def verified(self) -> bool:
        """Everything holds, checked against a manifest (without one, sizes and hashes are unchecked)."""
        return self.ok and self.manifest_digest is not None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "verified": self.verified,
            "quick": self.quick,
            "manifest_digest": self.manifest_digest,
            "files_checked": self.files_checked,
            "bytes_hashed": self.bytes_hashed,
            "findings": [f.to_dict() for f in self.findings],
        }

    def raise_for_problems(self) -> None:
        errs = self.errors
        if not errs:
            return
        first = errs[0]
        more = f" (and {len(errs) - 1} more problem(s); run `htrctl verify {self.path}`)" if len(errs) > 1 else ""
        cls = ModelMissingError if first.code in MISSING_CODES else ModelCorruptError
        raise cls(
            f"model directory {self.path}: {first.path}: {first.problem}{more}",
            remedy=first.remedy,
            detail=self.to_dict(),
        )


# --------------------------------------------------------------------------- safetensors


class HeaderError(ValueError):
    pass


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Parse a safetensors header without reading tensor data.

    Returns ``(tensors, data_start, file_size)`` where *tensors* maps names to
    ``{"dtype", "shape", "data_offsets"}`` (``__metadata__`` removed). Raises
    :class:`HeaderError` naming what is wrong. The declared header length is
    checked against the file size and a 100 MB cap *before* it is read.
    """
    size = os.path.getsize(path)
    if size < 8:
        raise HeaderError(f"file is {size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise HeaderError(f"header length {n} exceeds the file size {size} (truncated or not safetensors)")
        if n > MAX_HEADER_BYTES:
            raise HeaderError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"header is not valid JSON ({exc.__class__.__name__})") from exc
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_size = size - data_start
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise HeaderError(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise HeaderError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise HeaderError(f"tensor {name!r}: invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise HeaderError(f"tensor {name!r}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise HeaderError(f"tensor {name!r}: data_offsets {offsets} are not increasing")
        if end > data_size:
            raise HeaderError(
                f"tensor {name!r}: data_offsets end {end} lies beyond the file's {data_size} data bytes (truncated?)"
            )
        numel = 1
        for d in shape:
            numel *= d
        expected = int(numel * SUB_BYTE[dtype]) if dtype in SUB_BYTE else numel * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise HeaderError(f"tensor {name!r}: {end - begin} bytes for shape {shape} {dtype} (expected {expected})")
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise HeaderError(f"tensor data overlaps or leaves a hole at byte {pos}")
        pos = end
    if pos != data_size:
        raise HeaderError(f"{data_size - pos} trailing bytes after the last tensor")
    return header, data_start, size


# --------------------------------------------------------------------------- base and adapter


@dataclass
class WeightSet:
    """The tensors of a model directory (or a sub-directory such as merged/), from headers only."""

    tensors: dict[str, tuple[str, list[int]]]  # name -> (dtype, shape)
    files: list[str]  # weight files, relative to the model root


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


PICKLE_TO_SAFETENSORS = (
    "python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('adapter_model.bin', "
    "map_location='cpu', weights_only=True), 'adapter_model.safetensors')\""
)
# One adapter tensor: <module>.<kind> (PEFT strips "base_model.model." and the adapter name when it saves).
_LORA_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<kind>lora_A(?:\.[\w-]+)?\.weight|lora_B(?:\.[\w-]+)?\.(?:weight|bias)|lora_embedding_[AB]"
    r"|lora_magnitude_vector(?:\.weight)?|token_adapter\.trainable_tokens_delta)$")
_FULL_KEY = re.compile(r"^(?P<mod>.+?)(?:\.base_layer)?\.(?P<param>weight|bias)$")


@dataclass
class AdapterPlan:
    """What loading this adapter onto the base does, from headers and configs only (htrd's loader applies it)."""

    findings: list[Finding]
    vocab: int | None = None  # resize the base's embed_tokens/lm_head to this many rows before applying
    base_vocab: int | None = None  # the base's embedding rows
    tokenizer_size: int | None = None  # the adapter's own tokenizer (largest id + 1), when it has one

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]


def inspect_adapter(
    base_config: dict[str, Any],
    base: WeightSet,
    adapter_dir: Path,
    *,
    rel_prefix: str = ADAPTER_DIRNAME,
    base_label: str = "the base",
    base_dir: Path | None = None,
) -> AdapterPlan:
    """Every tensor of the adapter against the base's shapes, by the rules loading applies.

    htrd's loader (:func:`htrd.model.load_model`) refuses an adapter with any error here and applies
    :attr:`AdapterPlan.vocab`, so verify's verdict and the loader's agree. The rules: LoRA A/B (linear, conv,
    embedding), DoRA magnitudes and LoRA biases fit the module they adapt; full tensors (``modules_to_save``,
    saved embedding layers) equal the base tensor's shape, except the rows of ``embed_tokens``/``lm_head``,
    which say how far training resized the vocabulary (all of them must agree); a grown vocabulary needs the
    trained rows of both (an untied ``lm_head`` too), since the base cannot supply them; the adapter's tokenizer
    must fit the (resized) embedding. With *base_dir*, processor files that differ from the base's are an
    informational finding (htrd serves with the adapter's).
    """
    plan = AdapterPlan(findings=[])
    findings = plan.findings
    cfg_rel = f"{rel_prefix}/adapter_config.json"
    remedy = ("provision the base the adapter was trained on: htrctl provision ADAPTER_SRC DEST --base "
              "<that base's directory, host:path or hf://repo>")
    try:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        findings.append(Finding(cfg_rel, "adapter_config.json is missing", "copy the whole adapter directory",
                                "missing"))
        return plan
    except (ValueError, UnicodeDecodeError) as exc:
        findings.append(Finding(cfg_rel, f"not valid JSON ({exc})", "copy the adapter again", "bad_json"))
        return plan
    if not isinstance(acfg, dict):
        findings.append(Finding(cfg_rel, "not a JSON object", "copy the adapter again", "bad_json"))
        return plan
    peft_type = str(acfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        findings.append(Finding(cfg_rel, f"peft_type {peft_type!r}: htrd serves LoRA adapters only",
                                "train a LoRA adapter (peft.LoraConfig), or merge this one into the base where it "
                                "was trained and provision the merged model", "adapter_unsupported"))
        return plan
    # 1. architecture: the base's model_type against the base the adapter names
    named = acfg.get("base_model_name_or_path") or ""
    model_type = base_config.get("model_type") or ""
    archs = base_config.get("architectures") or []
    if isinstance(named, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", named) and model_type:
        repo_name = _norm(named.split("/", 1)[1])
        if not repo_name.startswith(_norm(model_type)):
            findings.append(Finding(cfg_rel, f"the adapter was trained on {named!r} but {base_label} is model_type "
                                    f"{model_type!r} ({', '.join(archs) or 'no architectures'})", remedy,
                                    "adapter_mismatch"))
    # 2. target modules exist in the base (PEFT: a list entry matches a module name or its dotted suffix, a
    #    string is a regex that must match a whole name)
    modules = {n.rsplit(".", 1)[0] for n in base.tensors if "." in n}
    targets = acfg.get("target_modules")
    if isinstance(targets, str):
        try:
            hit = any(re.fullmatch(targets, m) for m in modules)
        except re.error as exc:
            findings.append(Finding(cfg_rel, f"target_modules regex {targets!r} is invalid ({exc})",
                                    "fix the adapter's config", "adapter_mismatch"))
            hit = True
        if not hit:
            findings.append(Finding(cfg_rel, f"target_modules regex {targets!r} matches no module of {base_label}",
                                    remedy, "adapter_mismatch"))
    elif isinstance(targets, list):
        absent = [t for t in targets if t != "all-linear" and not any(m == t or m.endswith("." + t) for m in modules)]
        if absent:
            findings.append(Finding(cfg_rel, f"target_modules {absent} do not exist in {base_label}", remedy,
                                    "adapter_mismatch"))
    # 3. every tensor of the adapter against the base
    weights = adapter_dir / "adapter_model.safetensors"
    w_rel = f"{rel_prefix}/adapter_model.safetensors"
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            findings.append(Finding(f"{rel_prefix}/adapter_model.bin",
                                    "the adapter is a pickle (adapter_model.bin); only safetensors are loaded",
                                    f"convert it in the adapter's directory where it was trained: "
                                    f"{PICKLE_TO_SAFETENSORS}; then remove adapter_model.bin", "pickle_weights"))
        else:
            findings.append(Finding(w_rel, "the adapter weights are missing", "copy the whole adapter directory",
                                    "missing"))
        return plan
    try:
        header, _, _ = read_safetensors_header(weights)
    except OSError:
        return plan  # unreadable: reported by verify's per-file check
    except HeaderError as exc:
        findings.append(Finding(w_rel, str(exc), "copy the adapter again", "bad_header"))
        return plan
    _check_adapter_tensors(plan, acfg, header, base_config, base, base_label, w_rel, remedy)
    # 4. the adapter's own tokenizer and processor files
    tok_size = tokenizer_size(adapter_dir)
    plan.tokenizer_size = tok_size
    rows = plan.vocab or plan.base_vocab
    if tok_size is not None and rows is not None and tok_size > rows:
        findings.append(Finding(f"{rel_prefix}/tokenizer.json",
                                f"the adapter's tokenizer has {tok_size} tokens but the model's embedding has {rows} "
                                f"rows{' (as the adapter resizes it)' if plan.vocab else ''}: ids {rows}..{tok_size - 1}"
                                " have no embedding",
                                "save the adapter with the resized embed_tokens and lm_head (resize_token_embeddings("
                                "len(tokenizer)) before training, both in modules_to_save), or ship the tokenizer "
                                "training used", "tokenizer_too_large"))
    if base_dir is not None:
        differ = [n for n in PROCESSOR_FILES if (adapter_dir / n).is_file() and not _same_file(adapter_dir / n,
                                                                                               base_dir / n)]
        if differ:
            findings.append(Finding(rel_prefix, f"the adapter carries its own processor files that differ from the "
                                    f"base's ({', '.join(differ)}): htrd serves with the adapter's, as training used",
                                    "nothing to do; remove them from the adapter to serve with the base's", "adapter_processor",
                                    INFO))
    return plan


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def tokenizer_size(d: Path) -> int | None:
    """``len(tokenizer)`` as the embedding must hold it (largest id + 1), from the tokenizer files in *d*."""
    ids: list[int] = []
    try:
        tj = d / "tokenizer.json"
        if tj.is_file():
            data = json.loads(tj.read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                ids.extend(v for v in vocab.values() if isinstance(v, int))
            elif isinstance(vocab, list) and vocab:  # Unigram: [piece, score] by id
                ids.append(len(vocab) - 1)
            ids.extend(t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict)
                       and isinstance(t.get("id"), int))
        elif (d / "vocab.json").is_file():
            vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
            ids.extend(v for v in vocab.values() if isinstance(v, int))
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            added = json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
            ids.extend(int(k) for k in added if str(k).isdigit())
        at = d / "added_tokens.json"
        if at.is_file():
            ids.extend(v for v in json.loads(at.read_text(encoding="utf-8")).values() if isinstance(v, int))
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        return None
    return max(ids) + 1 if ids else None


def _check_adapter_tensors(plan: AdapterPlan, acfg: dict[str, Any], header: dict[str, Any],
                           base_config: dict[str, Any], base: WeightSet, base_label: str, w_rel: str,
                           remedy: str) -> None:
    tensors = base.tensors
    emb_name = next((n for n in sorted(tensors) if n.endswith("embed_tokens.weight") and "visual" not in n), None)
    text_cfg = base_config.get("text_config") if isinstance(base_config.get("text_config"), dict) else {}
    tied = bool(base_config.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    head_name = "lm_head.weight" if "lm_head.weight" in tensors else None
    base_rows = tensors[emb_name][1][0] if emb_name else None
    plan.base_vocab = base_rows

    def base_shape(module: str, param: str = "weight") -> tuple[str | None, list[int] | None]:
        name = _find_base_weight(tensors, module, param)
        if name is not None:
            return name, list(tensors[name][1])
        if module.rsplit(".", 1)[-1] == "lm_head" and param == "weight" and emb_name and (tied or not head_name):
            return "lm_head.weight", list(tensors[emb_name][1])  # tied: the embedding is the head
        return None, None

    def is_vocab(name: str | None) -> bool:
        return name is not None and (name == emb_name or name == "lm_head.weight")

    bad: list[str] = []
    sizes: list[tuple[str, int]] = []  # (what, rows) for the vocabulary, from every tensor that has it
    full_vocab: set[str] = set()  # "embed" / "head" whose whole (trained) matrix the adapter holds
    lora: dict[str, dict[str, list[int]]] = {}
    n_full = 0
    for key, info in sorted(header.items()):
        name = key.removeprefix("base_model.model.")
        shape = list(info["shape"])
        m = _LORA_KEY.match(name)
        if m:
            lora.setdefault(m.group("mod"), {})[_lora_kind(m.group("kind"))] = shape
            continue
        f = _FULL_KEY.match(name)
        if not f:
            bad.append(f"{key}: not a tensor PEFT loads into {base_label}")
            continue
        n_full += 1
        target, wshape = base_shape(f.group("mod"), f.group("param"))
        if target is None:
            bad.append(f"{key}: {base_label} has no such tensor (loading would ignore it)")
            continue
        if is_vocab(target) and f.group("param") == "weight" and len(shape) == 2:
            if shape[1:] != wshape[1:]:
                bad.append(f"{key}: {shape} does not fit {base_label}'s {target} {wshape}")
                continue
            sizes.append((target.rsplit(".", 1)[0].rsplit(".", 1)[-1], shape[0]))
            full_vocab.add("embed" if target == emb_name else "head")
        elif shape != wshape:
            bad.append(f"{key}: {shape} does not fit {base_label}'s {target} {wshape}")
    fan_in_fan_out = bool(acfg.get("fan_in_fan_out"))
    token_indices: list[int] = []
    tti = acfg.get("trainable_token_indices")
    if isinstance(tti, list):
        token_indices = [i for i in tti if isinstance(i, int)]
    elif isinstance(tti, dict):
        token_indices = [i for v in tti.values() if isinstance(v, list) for i in v if isinstance(i, int)]
    for module, kinds in sorted(lora.items()):
        target, w = base_shape(module)
        if target is None:
            bad.append(f"{module}: not in {base_label}")
            continue
        vocab_mod = is_vocab(target)
        a, b = kinds.get("lora_A"), kinds.get("lora_B")
        ea, eb = kinds.get("lora_embedding_A"), kinds.get("lora_embedding_B")
        mag, delta = kinds.get("lora_magnitude_vector"), kinds.get("token_adapter.trainable_tokens_delta")
        out_f = None
        if ea is not None or eb is not None:  # LoRA on an embedding: A (r, rows), B (dim, r)
            if ea is None or eb is None:
                bad.append(f"{module}: lora_embedding_A/lora_embedding_B pair incomplete")
                continue
            if len(w) != 2 or len(ea) != 2 or len(eb) != 2 or ea[0] != eb[1] or eb[0] != w[1]:
                bad.append(f"{module}: lora_embedding_A {ea} / lora_embedding_B {eb} do not fit base weight {w}")
                continue
            if vocab_mod:
                sizes.append((module.rsplit(".", 1)[-1] + " (LoRA)", ea[1]))
            elif ea[1] != w[0]:
                bad.append(f"{module}: lora_embedding_A {ea} does not fit base weight {w}")
                continue
            out_f = w[1]
        elif a is not None or b is not None:
            if a is None or b is None:
                bad.append(f"{module}: lora_A/lora_B pair incomplete")
                continue
            if len(w) == 2:  # Linear: A (r, in), B (out, r)
                out_f, in_f = (w[1], w[0]) if fan_in_fan_out else (w[0], w[1])
                ok = len(a) == 2 and len(b) == 2 and a[0] == b[1] and a[1] == in_f
                if ok and vocab_mod and not fan_in_fan_out:
                    sizes.append((module.rsplit(".", 1)[-1] + " (LoRA)", b[0]))
                    out_f = b[0]
                elif ok and b[0] != out_f:
                    ok = False
            elif len(w) > 2:  # Conv: A (r, in, *kernel), B (out, r, 1, ...)
                out_f = w[0]
                ok = (len(a) == len(w) == len(b) and a[0] == b[1] and a[1] == w[1] and a[2:] == w[2:]
                      and b[0] == w[0] and all(x == 1 for x in b[2:]))
            else:
                ok = False
            if not ok:
                bad.append(f"{module}: lora_A {a} / lora_B {b} do not fit base weight {w}")
                continue
            bias = kinds.get("lora_B.bias")
            if bias is not None and bias != [out_f]:
                bad.append(f"{module}: lora_B.bias {bias} does not fit base weight {w}")
                continue
            if bias is not None and _find_base_weight(tensors, module, "bias") is None:
                bad.append(f"{module}: a LoRA bias (lora_bias=True) on a layer without bias, which PEFT cannot merge")
                continue
        elif delta is None:
            bad.append(f"{module}: {', '.join(sorted(kinds))} without LoRA A/B")
            continue
        if mag is not None:  # DoRA: one magnitude per output feature
            numel = 1
            for x in mag:
                numel *= x
            if out_f is None or numel != out_f or max(mag) != out_f:
                bad.append(f"{module}: lora_magnitude_vector {mag} does not fit base weight {w}")
                continue
        if delta is not None and (len(w) != 2 or len(delta) != 2 or delta[1] != w[1]
                                  or (token_indices and delta[0] != len(token_indices))):  # one row per token index
            bad.append(f"{module}: trainable_tokens_delta {delta} does not fit base weight {w} and "
                       "trainable_token_indices")
    if not lora and not n_full:
        bad.append("no tensors")
    old_names = sorted(m for m in set(lora) | {k.rsplit(".", 1)[0] for k in header} if _old_style(
        m.removeprefix("base_model.model.")))
    if old_names:
        bad.insert(0, f"{old_names[0]}: named as transformers < 4.52 named modules (PEFT would not apply it); "
                   "load and save the adapter again with current transformers")
    untrained = _untrained_targets(acfg, tensors, set(lora))
    if untrained:
        bad.insert(0, f"the config targets {len(untrained)} module(s) the adapter holds no LoRA weights for, e.g. "
                   f"{untrained[0]} (PEFT would leave them untrained)")
    # modules_to_save named in the config must be in the file, else PEFT would serve the base's untrained copy
    mts = acfg.get("modules_to_save") or []
    if isinstance(mts, list):
        saved = {_FULL_KEY.match(k.removeprefix("base_model.model."))
                 for k in header}
        saved_mods = {m.group("mod") for m in saved if m}
        for entry in mts:
            if isinstance(entry, str) and not any(m == entry or m.endswith("." + entry) for m in saved_mods):
                bad.append(f"modules_to_save {entry!r}: the adapter holds no tensor for it (its training is lost)")
    if bad:
        total = len(lora) + n_full
        plan.findings.append(Finding(w_rel, f"the adapter ({total} modules) does not fit {base_label}, {len(bad)} "
                                     "problem(s): "
                                     f"{'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}", remedy,
                                     "adapter_mismatch"))
        return
    # the vocabulary: every tensor that has it agrees; loading resizes the base to it, exactly as training did
    rows = sorted({r for _, r in sizes})
    if len(rows) > 1:
        plan.findings.append(Finding(w_rel, "the adapter's vocabulary sizes disagree: " + ", ".join(
            f"{what} {r}" for what, r in sizes), "save the adapter again after resize_token_embeddings", "adapter_vocab"))
        return
    if rows and base_rows is not None and rows[0] != base_rows:
        if rows[0] > base_rows:
            need = {"embed": "embed_tokens"} | ({} if tied else {"head": "lm_head"})
            lacking = [v for k, v in need.items() if k not in full_vocab]
            if lacking:
                plan.findings.append(Finding(
                    w_rel, f"the adapter grows the vocabulary from {base_rows} to {rows[0]} rows but does not hold the "
                    f"trained {' and '.join(lacking)}: the new tokens' rows cannot be reproduced",
                    f"train with modules_to_save=[{', '.join(repr(x) for x in need.values())}] (or save the "
                    "embedding layers) and save the adapter again", "adapter_vocab"))
                return
        plan.vocab = rows[0]
    rows_now = plan.vocab or base_rows
    if token_indices and rows_now is not None and max(token_indices) >= rows_now:
        plan.findings.append(Finding(w_rel, f"trainable_token_indices reach {max(token_indices)} but the embedding "
                                     f"has {rows_now} rows", remedy, "adapter_vocab"))


def _lora_kind(kind: str) -> str:
    """``lora_A[.name].weight`` -> ``lora_A``; ``lora_B[.name].bias`` -> ``lora_B.bias``; DoRA's ``.weight`` dropped."""
    if kind.startswith(("lora_A", "lora_B")) and "." in kind:
        return kind[:6] + (".bias" if kind.endswith(".bias") else "")
    if kind.startswith("lora_magnitude_vector"):
        return "lora_magnitude_vector"
    return kind


_OLD_PREFIXES = ("model.layers.", "model.embed_tokens", "model.norm.", "visual.")


def _old_style(module: str) -> bool:
    """A module name as transformers < 4.52 gave Qwen-VL models (the text model at ``model.``, the vision
    tower at ``visual.``); today's names (``model.language_model.``, ``model.visual.``) are what PEFT matches."""
    return module.startswith(_OLD_PREFIXES) or module == "model.embed_tokens"


def _runtime_name(checkpoint_module: str) -> str:
    """The module's name in the loaded model, for a base checkpoint written with either naming."""
    if checkpoint_module.startswith("visual."):
        return "model." + checkpoint_module
    if checkpoint_module.startswith("model.") and _old_style(checkpoint_module):
        return "model.language_model." + checkpoint_module[len("model."):]
    return checkpoint_module


def _untrained_targets(acfg: dict[str, Any], tensors: dict[str, Any], have: set[str]) -> list[str]:
    """Modules PEFT wraps with LoRA (target_modules as a list, a regex or "all-linear", less exclude_modules)
    for which the adapter holds no LoRA tensor. Not decided (empty) with layers_to_transform."""
    if acfg.get("layers_to_transform") is not None:
        return []
    targets = acfg.get("target_modules")
    exclude = acfg.get("exclude_modules")
    skip = set(acfg.get("modules_to_save") or []) | ({"embed_tokens"} if acfg.get("trainable_token_indices") else set())
    mods = {}
    for name, (_, shape) in tensors.items():
        if name.endswith(".weight") and len(shape) >= 2:
            mods[_runtime_name(name[: -len(".weight")])] = shape
    out = []
    for m, shape in sorted(mods.items()):
        leaf = m.rsplit(".", 1)[-1]
        if any(m == x or m.endswith("." + x) for x in skip if isinstance(x, str)):
            continue
        if targets == "all-linear" or (isinstance(targets, list) and "all-linear" in targets):
            hit = len(shape) == 2 and leaf not in ("lm_head", "embed_tokens", "pos_embed")
        elif isinstance(targets, str):
            try:
                hit = re.fullmatch(targets, m) is not None
            except re.error:
                return []
        elif isinstance(targets, list):
            hit = any(m == t or m.endswith("." + t) for t in targets if isinstance(t, str))
        else:
            return []
        if hit and isinstance(exclude, str):
            try:
                hit = re.fullmatch(exclude, m) is None
            except re.error:
                return []
        elif hit and isinstance(exclude, list):
            hit = not any(m == e or m.endswith("." + e) for e in exclude if isinstance(e, str))
        if hit and m not in have:
            out.append(m)
    return out


def _find_base_weight(tensors: dict[str, Any], module: str, param: str = "weight") -> str | None:
    """The base checkpoint's tensor for *module* (named as the loaded model names it)."""
    candidates = [f"{module}.{param}"]
    # a base checkpoint written before transformers moved the text model under model.language_model
    # and the vision tower under model.visual
    if module.startswith("model.language_model."):
        candidates.append("model." + module[len("model.language_model."):] + "." + param)
    elif module.startswith("model.visual."):
        candidates.append(module[len("model."):] + "." + param)
    for c in candidates:
        if c in tensors:
            return c
    return None


def load_weight_set(root: Path, sub: str = "") -> tuple[WeightSet | None, list[Finding]]:
    """Tensors of the model in ``root/sub`` from its index or single safetensors file (headers only)."""
    d = root / sub if sub else root
    pre = f"{sub}/" if sub else ""
    findings: list[Finding] = []
    tensors: dict[str, tuple[str, list[int]]] = {}
    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            return None, [Finding(pre + index.name, f"index is not valid ({exc})", "copy the model again",
                                  "bad_index")]
        shards = sorted(set(weight_map.values()))
        headers: dict[str, dict[str, Any]] = {}
        for shard in shards:
            why = unsafe_relpath(shard) if isinstance(shard, str) else "not a string"
            if why or "/" in shard:
                findings.append(Finding(pre + index.name, f"index names shard {shard!r}: {why or 'in a subdirectory'}",
                                        "replace the index with the one from the model's source", "unsafe_path"))
                continue
            p = d / shard
            if not p.is_file():
                findings.append(Finding(pre + shard, f"shard named by {index.name} does not exist",
                                        "copy the missing shard (re-run htrctl provision)", "index_missing_shard"))
                continue
            try:
                headers[shard] = read_safetensors_header(p)[0]
            except (HeaderError, OSError):
                continue  # reported by the per-file check
        for name, shard in weight_map.items():
            h = headers.get(shard)
            if h is None:
                continue
            info = h.get(name)
            if info is None:
                findings.append(Finding(pre + shard, f"tensor {name!r} named by {index.name} is not in this shard",
                                        "copy the model again: index and shards come from different versions",
                                        "index_missing_tensor"))
                continue
            tensors[name] = (info["dtype"], info["shape"])
        return WeightSet(tensors, [pre + s for s in shards]), findings
    if single.is_file():
        try:
            h = read_safetensors_header(single)[0]
        except (HeaderError, OSError):
            return None, findings
        return WeightSet({k: (v["dtype"], v["shape"]) for k, v in h.items()}, [pre + single.name]), findings
    return None, findings


def read_config(d: Path) -> dict[str, Any] | None:
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def weights_dtype(ws: WeightSet) -> str | None:
    counts: dict[str, int] = {}
    for dtype, _ in ws.tensors.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else None


# --------------------------------------------------------------------------- the directory


def verify_model_dir(path: str | Path, *, quick: bool = False, progress: bool = False) -> VerifyReport:
    """Check *path* against its manifest and its own structure; never raises for a bad directory."""
    root = Path(path)
    report = VerifyReport(path=str(root), quick=quick)
    add = report.findings.append
    redo = f"re-provision it: htrctl provision SOURCE {root}"
    try:
        root.stat()
    except PermissionError:
        add(Finding(str(root), "model directory cannot be reached: permission denied",
                    "make it and its parent directories reachable by the daemon's user (chmod a+X on each)",
                    "unreadable"))
        return report
    except OSError:
        pass  # does not exist: reported just below
    if not root.is_dir():
        add(Finding(str(root), "model directory does not exist" if not root.exists() else "not a directory",
                    f"provision it: htrctl provision SOURCE {root}", "not_found"))
        return report

    files, unsafe = walk_files(root)
    for rel, why in unsafe:
        add(Finding(rel, why, "remove it; a model directory holds only regular files inside it", "unsafe_path"))

    # --- against the manifest
    manifest = None
    try:
        got = read_manifest(root)
    except ManifestFormatError as exc:
        add(Finding(MANIFEST_NAME, f"manifest is invalid: {exc}", redo, "bad_manifest"))
        got = None
    except OSError as exc:
        add(Finding(MANIFEST_NAME, f"manifest cannot be read: {exc.strerror}", "check permissions", "bad_manifest"))
        got = None
    if got is not None:
        manifest, report.manifest_digest = got
        sources = getattr(manifest, "sources", None) or {}
        if sources.get("model"):
            redo = f"re-provision it: htrctl provision {sources['model']} {root}"
    elif not any(f.code == "bad_manifest" for f in report.findings):
        add(Finding(MANIFEST_NAME, "no manifest: file sizes and hashes cannot be checked",
                    f"create one: htrctl provision {root} {root} (checks the directory and writes the manifest)",
                    "no_manifest", WARNING))

    present = set(files)
    to_hash: list[str] = []
    if manifest is not None:
        listed = set()
        for entry in manifest.files:
            why = unsafe_relpath(entry.path)
            if why:
                add(Finding(entry.path, f"manifest lists an unsafe path ({why})", redo, "unsafe_path"))
                continue
            listed.add(entry.path)
            p = root / entry.path
            if entry.path not in present:
                if p.is_symlink() or (p.exists() and not p.is_file()):
                    continue  # reported as unsafe above
                add(Finding(entry.path, "missing", redo, "missing"))
                continue
            size = p.stat().st_size
            report.files_checked += 1
            if size < entry.size:
                add(Finding(entry.path, f"truncated: {size} of {entry.size} bytes", redo, "truncated"))
            elif size > entry.size:
                add(Finding(entry.path, f"size {size} differs from the manifest's {entry.size}", redo, "size_mismatch"))
            elif not os.access(p, os.R_OK):
                continue  # reported as unreadable by the per-file check below
            else:
                to_hash.append(entry.path)
        for rel in sorted(present - listed):
            add(Finding(rel, "extra file not in the manifest", f"remove it, or re-provision: htrctl provision "
                        f"SOURCE {root}", "extra"))
        _check_identity(root, manifest, report, redo)
        if not quick and to_hash:
            expected = manifest.by_path()
            digests = hash_files(root, to_hash, progress=progress, label="verifying")
            report.bytes_hashed = sum(expected[r].size for r in to_hash)
            for rel in to_hash:
                if digests[rel] != expected[rel].sha256:
                    add(Finding(rel, "modified: sha256 differs from the manifest", redo, "modified"))

    # --- structure (headers, indexes, adapter pair), never reading tensor data
    for rel in files:
        if rel.endswith(".safetensors"):
            try:
                read_safetensors_header(root / rel)
            except HeaderError as exc:
                add(Finding(rel, f"bad safetensors file: {exc}", redo, "bad_header"))
            except OSError as exc:
                add(Finding(rel, f"cannot be read: {exc.strerror}",
                            f"make the directory readable by the daemon's user: chmod -R a+rX {root}", "unreadable"))
        elif rel.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
            add(Finding(rel, "pickle weights are never loaded (they can run code)",
                        "remove it; use the safetensors files", "pickle_weights", WARNING))

    _check_structure(root, report, redo)
    report.findings.sort(key=lambda f: (f.severity != ERROR,))
    return report


def _check_identity(root: Path, manifest: Any, report: VerifyReport, redo: str) -> None:
    """The manifest's own identity fields (adapter.sha256, the base's and adapter's config) agree with the files."""
    bad: list[str] = []
    by_path = manifest.by_path()
    adapter = manifest.adapter if isinstance(manifest.adapter, dict) else None
    if adapter is not None:
        apath = adapter.get("path") or ADAPTER_DIRNAME
        entry = by_path.get(f"{apath}/adapter_model.safetensors")
        if adapter.get("sha256") and (entry is None or entry.sha256 != adapter["sha256"]):
            bad.append(f"adapter.sha256 is not the sha256 of {apath}/adapter_model.safetensors in its file list")
        acfg = _json_file(root / apath / "adapter_config.json")
        if acfg is not None:
            for key in ("base_model_name_or_path", "peft_type", "r", "target_modules"):
                if key in adapter and _canon(adapter[key]) != _canon(acfg.get(key)):
                    bad.append(f"adapter.{key} {adapter[key]!r} differs from {apath}/adapter_config.json's "
                               f"{acfg.get(key)!r}")
    base = manifest.base if isinstance(manifest.base, dict) else None
    config = read_config(root)
    if base is not None and config is not None:
        for key in ("model_type", "architectures"):
            if key in base and _canon(base[key]) != _canon(config.get(key)):
                bad.append(f"base.{key} {base[key]!r} differs from config.json's {config.get(key)!r}")
    for problem in bad:
        report.findings.append(Finding(MANIFEST_NAME, f"manifest disagrees with the directory: {problem}", redo,
                                       "manifest_inconsistent"))


def _canon(v: Any) -> Any:
    return sorted(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v


def _json_file(p: Path) -> dict[str, Any] | None:
    try:
        v = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return v if isinstance(v, dict) else None


def _check_structure(root: Path, report: VerifyReport, redo: str) -> None:
    add = report.findings.append
    adapter_dir = root / ADAPTER_DIRNAME
    has_adapter = (adapter_dir / "adapter_config.json").is_file()
    config = read_config(root)
    if not (root / "config.json").is_file():
        if has_adapter:
            named = _adapter_base_name(adapter_dir) or "its base"
            add(Finding("config.json", f"the base model is missing: only the adapter is here, and it names "
                        f"{named!r} (loading would try to download it)",
                        f"provision adapter and base into a complete directory: htrctl provision {root} "
                        f"NEW_DIR --base <directory, host:path or hf://{named}>", "base_missing"))
        else:
            add(Finding("config.json", "missing: not a model directory", f"provision it: htrctl provision SOURCE "
                        f"{root}", "missing"))
        return
    if config is None:
        add(Finding("config.json", "not valid JSON", redo, "bad_json"))
        return
    ws, fs = load_weight_set(root)
    report.findings.extend(fs)
    if ws is None:
        if not fs:
            add(Finding("model.safetensors.index.json", "no weights: neither model.safetensors nor an index",
                        redo, "no_weights"))
        return
    broken = {f.path for f in report.findings if f.severity == ERROR}
    if has_adapter and not broken.intersection(ws.files):
        # (a truncated or corrupt shard hides its tensors: its own finding names it, not the adapter pair)
        report.findings.extend(inspect_adapter(config, ws, adapter_dir, base_dir=root).findings)
    merged = root / MERGED_DIRNAME
    if merged.is_dir():
        mws, mfs = load_weight_set(root, MERGED_DIRNAME)
        report.findings.extend(mfs)
        if mws is None and not mfs:
            add(Finding("merged/", "merged variant has no weights", "re-run htrctl provision --merge", "no_weights"))
        elif mws is not None:
            missing = sorted(set(ws.tensors) - set(mws.tensors))
            if missing:
                add(Finding("merged/", f"merged variant lacks {len(missing)} base tensor(s), e.g. {missing[0]!r}",
                            "re-run htrctl provision --merge", "merged_mismatch"))


def _adapter_base_name(adapter_dir: Path) -> str | None:
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
