"""Model: ``verify --quick`` of the configured directory, the adapter's base is local,
and the *service* runs offline (HF_HUB_OFFLINE=1 in its unit environment)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..modeldir import ADAPTER_DIRNAME as ADAPTER_DIR
from ..modeldir import MERGED_DIRNAME, has_merged
from .findings import FAIL, OK, WARN, Context, Finding

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")


def _verify(ctx: Context, model_dir: Path) -> Finding:
    try:
        from ..verify import verify_model_dir
    except ImportError as exc:
        return Finding("model.verify", WARN, f"verify unavailable ({exc}); structure not checked",
                       remedy="install a complete htrctl")
    rep = verify_model_dir(model_dir, quick=True)
    data = rep.to_dict()
    data["findings"] = data.get("findings", [])[:20]
    if rep.ok:
        warns = [f for f in rep.findings if getattr(f, "severity", "") == "warning"]  # "info" is no warning
        if warns:
            w = warns[0]
            return Finding("model.verify", WARN, f"verify --quick {model_dir}: {w.path}: {w.problem}", remedy=w.remedy,
                           data=data)
        return Finding("model.verify", OK, f"verify --quick {model_dir}: complete and consistent "
                       f"({rep.files_checked} files; manifest {str(rep.manifest_digest or '-')[:12]})", data=data)
    first = rep.errors[0]
    more = f" (+{len(rep.errors) - 1} more)" if len(rep.errors) > 1 else ""
    return Finding("model.verify", FAIL, f"verify --quick {model_dir}: {first.path}: {first.problem}{more}",
                   remedy=first.remedy, data=data)


def _adapter_base(model_dir: Path, variant: str) -> Finding:
    merged = model_dir / MERGED_DIRNAME
    if variant == "merged" or (variant == "auto" and has_merged(model_dir)):
        if not (merged / "config.json").is_file():
            return Finding("model.adapter-base", FAIL, f"model.variant is 'merged' but {merged} has no merged weights",
                           remedy=f"htrctl provision --merge ... {model_dir}, or set model.variant: adapter")
        return Finding("model.adapter-base", OK, f"loads the merged weights from {merged} (no base/adapter lookup)")
    cfg = model_dir / ADAPTER_DIR / "adapter_config.json"
    if not cfg.is_file():
        return Finding("model.adapter-base", FAIL, f"{cfg} is missing: no LoRA adapter to load",
                       remedy=f"provision the adapter into {model_dir / ADAPTER_DIR}")
    try:
        base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        return Finding("model.adapter-base", FAIL, f"{cfg} cannot be read: {exc}", remedy="re-provision the model")
    has_base = (model_dir / "config.json").is_file() and (
        any(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").is_file())
    data = {"adapter_base": base, "base_dir": str(model_dir), "base_present": has_base}
    if not has_base:
        return Finding("model.adapter-base", FAIL,
                       f"the adapter's base ({base}) is not in {model_dir}: loading it would download "
                       "the whole base model (the incident's 'hang')",
                       remedy=f"provision base + adapter: htrctl provision SOURCE {model_dir}", data=data)
    if base and Path(base).is_absolute() and not Path(base).exists():
        return Finding("model.adapter-base", WARN, f"the adapter names base path {base}, which does not exist; "
                       f"htrd loads the base from {model_dir} instead", data=data)
    return Finding("model.adapter-base", OK, f"the adapter's base ({base}) is local: loaded from {model_dir}, "
                   "never from the hub", data=data)


def _offline(ctx: Context) -> Finding:
    senv = ctx.service_env()
    if not senv.installed:
        return Finding("model.offline", WARN, f"{ctx.paths.service_unit} is not installed: cannot check that the "
                       "service runs with HF_HUB_OFFLINE=1", remedy="htrctl service install")
    v = senv.env.get("HF_HUB_OFFLINE")
    data = {"HF_HUB_OFFLINE": v, "TRANSFORMERS_OFFLINE": senv.env.get("TRANSFORMERS_OFFLINE"),
            "files": senv.files(), "problems": senv.problems}
    if v is None:
        return Finding("model.offline", WARN, f"HF_HUB_OFFLINE is not set in {ctx.paths.service_unit}'s "
                       "environment (htrd sets it itself, but helpers it starts might reach the hub)",
                       remedy="add Environment=HF_HUB_OFFLINE=1 (htrctl service install writes it)", data=data)
    if v.strip().lower() not in _TRUE:
        return Finding("model.offline", FAIL, f"{ctx.paths.service_unit} sets HF_HUB_OFFLINE={v}: a missing file "
                       "would start a silent multi-GB download", remedy="set Environment=HF_HUB_OFFLINE=1 "
                       f"(check {', '.join(senv.files())})", data=data)
    return Finding("model.offline", OK, f"the service runs offline (HF_HUB_OFFLINE={v} in "
                   f"{', '.join(senv.files())})", data=data)


def check(ctx: Context) -> list[Finding]:
    model_dir = Path(ctx.settings.model.dir)
    out: list[Finding] = []
    if not model_dir.is_dir():
        out.append(Finding("model.dir", FAIL, f"model directory {model_dir} does not exist",
                           remedy=f"provision it: htrctl provision SOURCE {model_dir} (or fix model.dir)"))
    else:
        out.append(_verify(ctx, model_dir))
        out.append(_adapter_base(model_dir, ctx.settings.model.variant))
    out.append(_offline(ctx))
    return out
