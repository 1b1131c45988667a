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
from .modeldir import ADAPTER_DIRNAME, MERGED_DIRNAME

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


def check_adapter_pair(
    base_config: dict[str, Any],
    base: WeightSet,
    adapter_dir: Path,
    *,
    rel_prefix: str = ADAPTER_DIRNAME,
    base_label: str = "the base",
) -> list[Finding]:
    """Does the LoRA adapter in *adapter_dir* fit this base? Headers and configs only."""
    findings: list[Finding] = []
    cfg_rel = f"{rel_prefix}/adapter_config.json"
    remedy = ("provision the base the adapter was trained on: htrctl provision ADAPTER_SRC DEST --base "
              "<that base's directory, host:path or hf://repo>")
    try:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [Finding(cfg_rel, "adapter_config.json is missing", "copy the whole adapter directory", "missing")]
    except (ValueError, UnicodeDecodeError) as exc:
        return [Finding(cfg_rel, f"not valid JSON ({exc})", "copy the adapter again", "bad_json")]
    # 1. architecture: the base's model_type against the base the adapter names
    named = acfg.get("base_model_name_or_path") or ""
    model_type = base_config.get("model_type") or ""
    archs = base_config.get("architectures") or []
    if re.fullmatch(r"[\w.-]+/[\w.-]+", named) and model_type:
        repo_name = _norm(named.split("/", 1)[1])
        if not repo_name.startswith(_norm(model_type)):
            findings.append(Finding(cfg_rel, f"the adapter was trained on {named!r} but {base_label} is model_type "
                                    f"{model_type!r} ({', '.join(archs) or 'no architectures'})", remedy,
                                    "adapter_mismatch"))
    # 2. target modules exist in the base
    modules = {n.rsplit(".", 1)[0] for n in base.tensors if "." in n}
    targets = acfg.get("target_modules")
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in modules):
            findings.append(Finding(cfg_rel, f"target_modules regex {targets!r} matches no module of {base_label}",
                                    remedy, "adapter_mismatch"))
    elif isinstance(targets, list):
        absent = [t for t in targets if t != "all-linear" and not any(m == t or m.endswith("." + t) for m in modules)]
        if absent:
            findings.append(Finding(cfg_rel, f"target_modules {absent} do not exist in {base_label}", remedy,
                                    "adapter_mismatch"))
    # 3. LoRA tensor shapes agree with the base weights
    weights = adapter_dir / "adapter_model.safetensors"
    w_rel = f"{rel_prefix}/adapter_model.safetensors"
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            findings.append(Finding(w_rel, "the adapter is a pickle (adapter_model.bin); only safetensors are loaded",
                                    "convert it to safetensors where it was trained", "pickle_weights"))
        else:
            findings.append(Finding(w_rel, "the adapter weights are missing", "copy the whole adapter directory",
                                    "missing"))
        return findings
    try:
        header, _, _ = read_safetensors_header(weights)
    except OSError:
        return findings  # unreadable: reported by verify's per-file check
    except HeaderError as exc:
        return findings + [Finding(w_rel, str(exc), "copy the adapter again", "bad_header")]
    fan_in_fan_out = bool(acfg.get("fan_in_fan_out"))
    bad: list[str] = []
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, info in header.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
        if not m:
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = info["shape"]
    for module, ab in sorted(pairs.items()):
        target = _find_base_weight(base.tensors, module)
        if target is None:
            bad.append(f"{module}: not in {base_label}")
            continue
        wshape = base.tensors[target][1]
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None:
            bad.append(f"{module}: lora_A/lora_B pair incomplete")
            continue
        if len(wshape) != 2 or len(a) != 2 or len(b) != 2:
            continue  # conv/embedding LoRA: shapes follow other rules
        out_f, in_f = (wshape[1], wshape[0]) if fan_in_fan_out else (wshape[0], wshape[1])
        if a[0] != b[1] or a[1] != in_f or b[0] != out_f:
            bad.append(f"{module}: lora_A {a} / lora_B {b} do not fit base weight {wshape}")
    if pairs and bad:
        findings.append(Finding(w_rel, f"{len(bad)} of {len(pairs)} LoRA modules do not fit {base_label}: "
                                f"{'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}", remedy, "adapter_mismatch"))
    return findings


def _find_base_weight(tensors: dict[str, Any], module: str) -> str | None:
    candidates = [module + ".weight"]
    # checkpoints written before/after transformers moved the text model under model.language_model
    if module.startswith("model.language_model."):
        candidates.append("model." + module[len("model.language_model."):] + ".weight")
    elif module.startswith("model."):
        candidates.append("model.language_model." + module[len("model."):] + ".weight")
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
        report.findings.extend(check_adapter_pair(config, ws, adapter_dir))
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
