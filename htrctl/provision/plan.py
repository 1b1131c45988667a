"""The plan: every DEST file and the local path it comes from; the base resolved locally; the adapter/base
pair checked from headers before anything is copied."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import IncompatibleAdapterError, ModelMissingError, ProvisionError
from ..manifest import Manifest, ManifestFormatError, read_manifest, unsafe_relpath, walk_files
from ..modeldir import ADAPTER_DIRNAME
from ..verify import (
    ERROR,
    HeaderError,
    inspect_adapter,
    load_weight_set,
    read_config,
    read_safetensors_header,
    weights_dtype,
)
from .fetch import fetch_sftp
from .locations import Hub, Local, Remote, parse_location
from .transport import pick_transport, rdir, run_rsync

logger = logging.getLogger(__name__)

# What a base needs from the hub / a cache (no pickles, no READMEs' images).
BASE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*", "LICENSE*"]


@dataclass
class PlanFile:
    rel: str  # path in DEST
    src: Path  # local path to read
    size: int
    mtime_ns: int
    origin: str  # "model" | "base"
    sha256: str | None = None


def local_tree(root: Path, *, trusted_links: bool = False) -> dict[str, Path]:
    """Files under *root* as {relative path: path to read}. *trusted_links*: an HF cache snapshot."""
    if trusted_links:
        out: dict[str, Path] = {}
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                if unsafe_relpath(rel) is None and full.exists() and not rel.startswith(".cache/"):
                    out[rel] = full.resolve()
        return out
    files, unsafe = walk_files(root)
    if unsafe:
        rel, why = unsafe[0]
        raise ProvisionError(f"{root / rel}: {why}", remedy="remove it from the source or copy the file itself")
    return {rel: root / rel for rel in files}


def layout(root: Path, files: dict[str, Path]) -> tuple[dict[str, Path], bool]:
    """Map a source tree to DEST paths; returns (files, has_base)."""
    if "config.json" in files:
        return files, True
    if f"{ADAPTER_DIRNAME}/adapter_config.json" in files:
        return files, False
    if "adapter_config.json" in files:  # a bare PEFT adapter directory
        return {f"{ADAPTER_DIRNAME}/{rel}": p for rel, p in files.items()}, False
    raise ProvisionError(
        f"{root} is neither a model directory (config.json) nor a LoRA adapter (adapter_config.json)",
        remedy="point SOURCE at the model directory (base files + final_model/) or at the adapter",
    )


def hf_cache_dir() -> Path:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_hub(hub: Hub, *, allow_download: bool, progress: bool) -> Path:
    """The local snapshot of *hub*: from the cache only, or downloaded when explicitly allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(hub.repo, revision=hub.revision, local_files_only=True,
                                      allow_patterns=BASE_PATTERNS, cache_dir=hf_cache_dir()))
        if (path / "config.json").is_file():
            return path
    except LocalEntryNotFoundError:
        pass
    if not allow_download:
        raise ModelMissingError(
            f"{hub} is not in the local Hugging Face cache ({hf_cache_dir()})",
            remedy="pass --allow-download to fetch it from the hub, or --base DIR|host:path for a copy you have",
        )
    logger.info("downloading %s from the hub (explicitly allowed)", hub)
    try:
        return Path(snapshot_download(hub.repo, revision=hub.revision, allow_patterns=BASE_PATTERNS,
                                      cache_dir=hf_cache_dir(), tqdm_class=None if progress else _SilentTqdm))
    except Exception as exc:  # noqa: BLE001 - translated into one actionable line
        name = type(exc).__name__
        if "Offline" in name or "Connect" in name or "LocalEntryNotFound" in name or isinstance(exc, OSError):
            raise ProvisionError(
                f"cannot download {hub}: the hub is unreachable from this machine ({name})",
                remedy="copy the base from a machine that has it: --base [user@]host:/path/to/base",
            ) from exc
        raise ProvisionError(f"cannot download {hub}: {name}: {exc}",
                             remedy="check the repository id, revision and HF_TOKEN") from exc


class _SilentTqdm:  # pragma: no cover - a tqdm stand-in when progress is off
    def __init__(self, *a: Any, **k: Any) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self) -> "_SilentTqdm":
        return self

    def __exit__(self, *a: Any) -> None:
        pass

    @classmethod
    def get_lock(cls) -> threading.RLock:
        return threading.RLock()

    @classmethod
    def set_lock(cls, lock: Any) -> None:
        pass


def _adapter_cfg(files: dict[str, Path]) -> dict[str, Any] | None:
    p = files.get(f"{ADAPTER_DIRNAME}/adapter_config.json")
    if p is None:
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProvisionError(f"{p}: not valid JSON ({exc})", remedy="copy the adapter again") from exc


def _cmd_for(source: str, dest: str, extra: str) -> str:
    return f"htrctl provision {shlex.quote(source)} {shlex.quote(dest)} {extra}"


def _resolve_base(
    source: str, dest: str, base: str | None, acfg: dict[str, Any], *, allow_download: bool, progress: bool,
    ssh: str | None, work: Path, transport: str = "auto",
) -> tuple[Path, str]:
    """A local directory holding the base model for an adapter-only source, and its label."""
    named = acfg.get("base_model_name_or_path") or ""
    if base:
        loc = parse_location(base)
        if isinstance(loc, Hub):
            return resolve_hub(loc, allow_download=allow_download, progress=progress), str(loc)
        if isinstance(loc, Remote):
            target = work / "base"
            target.mkdir(parents=True, exist_ok=True)
            if pick_transport(loc, transport, ssh) == "sftp":
                fetch_sftp(loc, target, None, work / "sftp-base-journal.json", ssh=ssh, progress=progress)
            else:
                run_rsync([f"{loc.host}:{rdir(loc.path)}", str(target) + "/"], ssh=ssh, progress=progress)
            return target, str(loc)
        if not (loc.path / "config.json").is_file():
            raise ModelMissingError(f"--base {base}: no config.json there (not a model directory)",
                                    remedy="point --base at the base model's directory")
        return loc.path, str(loc.path)
    if named and os.path.isabs(named) and (Path(named) / "config.json").is_file():
        return Path(named), named
    if re.fullmatch(r"[\w.-]+/[\w.-]+", named):
        try:
            return resolve_hub(Hub(named), allow_download=allow_download, progress=progress), f"hf://{named}"
        except ModelMissingError:
            pass
    raise ModelMissingError(
        f"the adapter's base model {named or '(unnamed)'!r} is missing: {source} holds only the adapter, no --base "
        f"was given, and it is not in the local Hugging Face cache ({hf_cache_dir()}); loading would download it",
        remedy=(f"copy it from a machine that has it: {_cmd_for(source, dest, '--base [user@]host:/path/to/base')}"
                + (f"  or fetch it from the hub: {_cmd_for(source, dest, '--allow-download')}" if named else "")),
    )


def _check_pair(files: dict[str, Path], plan_root_base: Path | None) -> dict[str, Any]:
    """Header-only checks of every safetensors file and of the adapter against the base; returns base info."""
    for rel, p in sorted(files.items()):
        if rel.endswith(".safetensors"):
            try:
                read_safetensors_header(p)
            except HeaderError as exc:
                raise ProvisionError(f"{p}: bad safetensors file: {exc}",
                                     remedy="the source is damaged: copy it again from where it was made") from exc
    # a temporary view of the DEST layout (symlinks), so the same checks as verify run on it
    with tempfile.TemporaryDirectory(prefix="htr-view-") as tmp:
        view = Path(tmp)
        for rel, p in files.items():  # every file: the adapter check also reads tokenizers, templates, .bin names
            (view / rel).parent.mkdir(parents=True, exist_ok=True)
            (view / rel).symlink_to(p.resolve())
        config = read_config(view) or {}
        ws, findings = load_weight_set(view)
        errs = [f for f in findings if f.severity == ERROR]
        if errs:
            raise ModelMissingError(f"{errs[0].path}: {errs[0].problem}", remedy="copy the whole base model")
        if ws is None:
            raise ModelMissingError("the base has no weights (no model.safetensors, no index)",
                                    remedy="copy the whole base model")
        info: dict[str, Any] = {
            "model_type": config.get("model_type"),
            "architectures": config.get("architectures"),
            "dtype": weights_dtype(ws),
        }
        if (view / ADAPTER_DIRNAME / "adapter_config.json").exists():
            errs = inspect_adapter(config, ws, view / ADAPTER_DIRNAME, base_dir=view).errors
            if errs:
                raise IncompatibleAdapterError(f"{errs[0].path}: {errs[0].problem}", remedy=errs[0].remedy,
                                               detail=[e.to_dict() for e in errs])
        return info


def gather(
    source: str, src_loc: Local | Remote | Hub, dest: str, *, base: str | None, allow_download: bool,
    progress: bool, ssh: str | None, work: Path, fetched: Path | None = None, transport: str = "auto",
) -> tuple[list[PlanFile], dict[str, Any], str | None, Manifest | None]:
    """The plan: every DEST file with the local path it comes from; base and adapter identity."""
    src_manifest = None
    if isinstance(src_loc, Hub):
        root = resolve_hub(src_loc, allow_download=allow_download, progress=progress)
        files, has_base = layout(root, local_tree(root, trusted_links=True))
        base_root, base_label = None, str(src_loc)
    else:
        root = fetched if fetched is not None else src_loc.path.absolute()
        if not root.is_dir():
            raise ModelMissingError(f"{source}: no such directory", remedy="check the SOURCE path")
        files, has_base = layout(root, local_tree(root))
        try:
            got = read_manifest(root)
            src_manifest = got[0] if got else None
        except ManifestFormatError:
            src_manifest = None
        label = str(root) if isinstance(src_loc, Local) else source
        base_root, base_label = None, (src_manifest.sources.get("base") if src_manifest else None) or label
    acfg = _adapter_cfg(files)
    origins = {rel: "model" for rel in files}
    if not has_base:
        base_root, base_label = _resolve_base(source, dest, base, acfg or {}, allow_download=allow_download,
                                              progress=progress, ssh=ssh, work=work, transport=transport)
        base_files = local_tree(base_root, trusted_links=_in_hf_cache(base_root))
        base_files = {r: p for r, p in base_files.items() if not r.startswith(f"{ADAPTER_DIRNAME}/")}
        merged_files = dict(base_files)
        merged_files.update(files)  # the model source's own files win (its processor, its adapter)
        for rel in base_files:
            if rel not in files:
                origins[rel] = "base"
        files = merged_files
    elif base:
        logger.warning("--base %s ignored: %s already holds a base model", base, source)
    info = _check_pair(files, base_root)
    plan = []
    for rel, p in sorted(files.items()):
        st = p.stat()
        plan.append(PlanFile(rel, p, st.st_size, st.st_mtime_ns, origins[rel]))
    identity: dict[str, Any] = {
        "base": {"id": (acfg or {}).get("base_model_name_or_path") or base_label, "source": base_label, **info},
        "adapter": None,
    }
    if acfg is not None:
        identity["adapter"] = {
            "path": ADAPTER_DIRNAME,
            "base_model_name_or_path": acfg.get("base_model_name_or_path"),
            "peft_type": acfg.get("peft_type"),
            "r": acfg.get("r"),
            "lora_alpha": acfg.get("lora_alpha"),
            "target_modules": acfg.get("target_modules"),
        }
    return plan, identity, base_label, src_manifest


def _in_hf_cache(p: Path) -> bool:
    try:
        p.resolve().relative_to(hf_cache_dir().resolve())
        return True
    except ValueError:
        return False


def trusted_hashes(plan: list[PlanFile], src_manifest: Manifest | None, src_root: Path | None) -> None:
    """Use a source manifest's hashes for files it recorded unchanged (size and mtime)."""
    if src_manifest is None or src_root is None:
        return
    entries = src_manifest.by_path()
    for pf in plan:
        e = entries.get(pf.rel)
        prov = src_manifest.provenance.get(pf.rel)
        if e and prov and len(prov) == 4 and e.size == pf.size and prov[3] == pf.mtime_ns and pf.origin == "model":
            pf.sha256 = e.sha256


def carry_variants(manifest: Manifest, src_manifest: Manifest | None, plan: list[PlanFile]) -> None:
    """A source's merged/ variant travels with its record in the manifest."""
    if src_manifest is None:
        return
    rels = {pf.rel for pf in plan}
    for name, v in src_manifest.variants.items():
        if any(r.startswith(f"{v.get('path', name)}/") for r in rels):
            manifest.variants[name] = dict(v)
