"""One typed settings object, shared by the CLI and the daemon.

Lookup order for the file: ``--config`` > ``$HTR_CONFIG`` > ``/etc/htr/htr.yaml``
> built-in defaults. Then ``HTR_<SECTION>__<FIELD>`` environment variables
override single fields (``HTR_GPU__SELECT=cpu``, ``HTR_LIMITS__QUEUE_LENGTH=8``).
Unknown keys and bad values fail with the file, the dotted field name and what
is allowed. From the environment, ``null`` sets None (``HTR_SOCKET__GROUP=null``),
a socket mode is octal (``HTR_SOCKET__MODE=660``), and a variable that maps to
nothing is refused (``HTR_GPU_SELECT``) or logged, never ignored silently -- the
behaviour of pydantic-settings (``env_nested_delimiter="__"``,
``env_parse_none_str="null"``, ``extra="forbid"``). ``configs/htr.yaml`` documents every field with its default (shipped in
the package: ``htrctl config template`` prints it); a test keeps it in step with
this module.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

logger = logging.getLogger(__name__)

SYSTEM_CONFIG = Path("/etc/htr/htr.yaml")
ENV_CONFIG = "HTR_CONFIG"
ENV_PREFIX = "HTR_"

_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
GPU_POLICIES = ("most-free", "first", "cpu")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSettings(_Section):
    dir: Path = Field(Path("/var/lib/htr/model"), description="the provisioned model directory")
    variant: Literal["auto", "merged", "adapter"] = Field(
        "auto", description="auto: merged weights when the directory has them, else base + adapter"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on a GPU, float32 on CPU"
    )
    verify_on_start: Literal["quick", "full", "off"] = Field(
        "quick", description="verification of the directory before loading"
    )


class GpuSettings(_Section):
    select: str = Field(
        "most-free",
        description="one GPU: a UUID (GPU-...), an index, 'most-free', 'first', or 'cpu'; never several",
    )
    min_free_headroom_gib: float = Field(2.0, ge=0, description="memory kept free beyond the weights")

    @field_validator("select")
    @classmethod
    def _one_gpu(cls, v: str) -> str:
        v = str(v).strip()
        if any(sep in v for sep in (",", " ", ";")) or v in ("auto", "all", "balanced"):
            raise ValueError(
                f"'{v}' would use several GPUs; the model must live on one GPU "
                "(run one replica per GPU with htr@.service instead)"
            )
        if v in GPU_POLICIES or v.isdigit() or _UUID_RE.match(v):
            return v
        raise ValueError(f"'{v}' is not a GPU UUID (GPU-xxxxxxxx-...), an index, or one of {GPU_POLICIES}")


class SocketSettings(_Section):
    path: Path = Field(Path("/run/htr/htr.sock"), description="the Unix socket htrd listens on")
    group: str | None = Field("htr", description="group owning the socket; null keeps the process's group")
    mode: int = Field(0o660, description="socket file mode (octal in YAML: 0o660)")

    @field_validator("mode", mode="before")
    @classmethod
    def _octal(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return int(v, 8)  # "0o660", "0660", "660"
            except ValueError:
                raise ValueError(f"{v!r} is not an octal mode such as 0o660") from None
        return v

    @field_validator("mode")
    @classmethod
    def _not_world(cls, v: int) -> int:
        if v & 0o007:
            raise ValueError(f"{oct(v)} gives other users access; use 0o660 or stricter")
        if v & ~0o777:
            raise ValueError(f"{oct(v)} is not a permission mode (0o000..0o770)")
        return v


class LimitSettings(_Section):
    queue_length: int = Field(256, ge=1, le=100_000, description="images waiting; beyond it 503 + Retry-After")
    request_deadline_s: float = Field(120.0, gt=0, le=3600, description="a request not done by then gets 504")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest request body")
    read_timeout_s: float = Field(30.0, gt=0, le=3600, description="a client's headers and body must arrive by then")
    max_image_pixels: int = Field(40_000_000, ge=1024, description="largest decoded image (bomb guard)")
    max_images_per_request: int = Field(256, ge=1, le=10_000, description="images (lines, pages) per request")
    max_request_pixels: int | None = Field(
        None, ge=1024, description="declared pixels of all images and pages of one request; null: from host memory"
    )
    max_pixels_in_flight: int | None = Field(
        None, ge=1024, description="declared pixels of all requests being served at once; null: from host memory"
    )
    batch_sizes: list[int] = Field(
        [1, 2, 4, 8, 16, 32, 64, 128, 256], description="batch sizes warmed and served; the fast generator's slots "
        "are the largest whose KV cache fits beside the model in the device's free memory"
    )
    batch_window_ms: float = Field(5.0, ge=0, le=1000, description="how long to wait for requests already received to join a batch")
    drain_timeout_s: float = Field(60.0, gt=0, le=3600, description="SIGTERM: finish in-flight work by then")
    preprocess_workers: int | None = Field(
        None, ge=0, le=256, description="processes that decode and preprocess images, off htrd's interpreter "
        "(its GIL); null: half the cores, at most 8; 0: threads in htrd's own process instead (one per core)"
    )
    preprocess_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="preprocess_workers > 0: an image not preprocessed by then (a decoder "
        "hanging on a hostile file) gets its worker processes killed and restarted; that file fails, others retry"
    )

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 or n > 1024 for n in v):
            raise ValueError("must be a non-empty list of integers between 1 and 1024")
        return sorted(set(v))


class GenerationSettings(_Section):
    prompt: str = Field(
        "Transcribe the handwritten text in this image exactly. Output only the text.",
        min_length=1,
        max_length=4000,
        description="the instruction sent with every image",
    )
    max_new_tokens: int = Field(256, ge=1, le=8192, description="upper bound on tokens per line")
    static_cache: Literal["auto"] | bool = Field(
        "auto", description="auto/true: the fast generator (merged LoRA, static KV cache with slots, continuous "
        "batching, CUDA graphs on a GPU); false: HF generate on static batches (reference, debugging)"
    )
    continuous_batching: bool = Field(
        True, description="lines join the running batch at a step boundary; false: a batch runs to its end "
        "before the next starts (static batching: for comparison in benchmarks)"
    )
    join_wait_ms: float = Field(
        30.0, ge=0, le=5000, description="while lines decode, how long a newcomer waits at most for requests "
        "already on their way (being preprocessed) to share its prefill (one line's prefill costs the GPU ~40 % "
        "of four lines'); with none on its way it joins at the next step"
    )
    prefill_chunk: int = Field(
        16, ge=1, le=1024, description="most lines prefilled together while others decode (bounds their stall); "
        "a step boundary takes at most this many newcomers more than the lines that left at the boundary before"
    )
    mixed_steps: bool = Field(
        False, description="fast generator on a GPU with flash attention (and the CPU): prefill newcomers' "
        "prompts in chunks inside the decode steps (one forward for a chunk and the running lines' next tokens) "
        "instead of between them; measured on an H200 no faster yet (README), so off by default"
    )
    prefill_tokens: int = Field(
        512, ge=8, le=16384, description="mixed_steps: most prompt tokens prefilled inside one decode step, with "
        "the running lines' next tokens (bounds how much a newcomer's prefill slows them; larger: faster "
        "prefill under heavy load, slower tokens meanwhile)"
    )
    decode_attention: Literal["auto", "triton", "flash", "sdpa"] = Field(
        "auto", description="fast generator: the decode steps' attention kernel. auto: Triton (each line's own "
        "keys, a KV head's query heads together) where it runs and passes its start-up check, else flash "
        "attention's variable-length kernel, else SDPA over the masked span; a kernel named here that cannot "
        "run falls back the same way, with a warning"
    )
    compile: bool = Field(True, description="static_cache on a GPU: fuse the decode step's ops with torch.compile")
    compile_cache_dir: Path | None = Field(
        None, description="inductor/triton kernel cache; null: $TORCHINDUCTOR_CACHE_DIR/$TRITON_CACHE_DIR or torch's"
    )
    max_cache_len: int = Field(
        1024, ge=64, le=65536, description="static KV-cache slots per image (prompt + new tokens); longer: eager path"
    )
    min_new_tokens: int = Field(
        0, ge=0, le=8192, description="benchmarks only: suppress EOS before this many tokens (0 in production)"
    )

    @property
    def fast_generator(self) -> bool:
        """Whether htrd serves with the fast generator (static_cache auto or true) rather than HF generate."""
        return self.static_cache is not False


class WatchdogSettings(_Section):
    generate_timeout_s: float = Field(
        300.0, gt=0, description="a generate call stuck longer than this stops the watchdog pings"
    )
    ping_interval_s: float = Field(0.0, ge=0, description="0: half of systemd's WatchdogSec")


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class Settings(_Section):
    model: ModelSettings = ModelSettings()
    gpu: GpuSettings = GpuSettings()
    socket: SocketSettings = SocketSettings()
    limits: LimitSettings = LimitSettings()
    generation: GenerationSettings = GenerationSettings()
    watchdog: WatchdogSettings = WatchdogSettings()
    log: LogSettings = LogSettings()

    # Where this object came from (not a setting; excluded from dumps).
    source: str = Field("<defaults>", exclude=True, repr=False)


def resolve_config_path(explicit: str | os.PathLike | None = None, env: dict | None = None) -> Path | None:
    """The config file to read, by the lookup order; None means built-in defaults."""
    env = os.environ if env is None else env
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist", remedy="check --config")
        return p
    if env.get(ENV_CONFIG):
        p = Path(env[ENV_CONFIG])
        if not p.is_file():
            raise ConfigError(f"config file {p} (from ${ENV_CONFIG}) does not exist", remedy=f"fix or unset ${ENV_CONFIG}")
        return p
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG
    return None


# HTR_* variables that are not settings (read by htrctl, htrd, the tests and benchmarks themselves).
ENV_NOT_SETTINGS = frozenset({
    "HTR_CONFIG", "HTR_DEBUG", "HTR_SSH", "HTR_RSYNC_OPTS", "HTR_TEST_FAULTS", "HTR_NVML_FAKE", "HTR_CI",
    "HTR_TEST_CACHE", "HTR_LOAD_REQUESTS", "HTR_RELIABILITY_RESULTS",
})
# Fields whose value is kept as typed: a GPU index stays "0", a socket mode "660" is octal.
_RAW_FIELDS = {"dir", "path", "prompt", "select", "group", "mode"}
NULL = "null"  # HTR_SOCKET__GROUP=null sets None (pydantic-settings' env_parse_none_str)


def _env_overrides(env: dict) -> dict[str, Any]:
    """``HTR_SECTION__FIELD=value`` → nested dict; values parsed as YAML scalars, ``null`` is None.

    An ``HTR_*`` variable that is neither a setting nor one of :data:`ENV_NOT_SETTINGS`
    is refused when it looks like a setting (``HTR_GPU_SELECT``: the section's name,
    one underscore) and logged otherwise -- never ignored silently.
    """
    out: dict[str, Any] = {}
    sections = [k for k in Settings.model_fields if k != "source"]
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key in ENV_NOT_SETTINGS:
            continue
        if "__" not in key:
            rest = key[len(ENV_PREFIX):].lower()
            near = next((sec for sec in sections if rest.startswith(sec + "_")), None)
            if near is not None:
                hint = f"{ENV_PREFIX}{near.upper()}__{rest[len(near) + 1:].upper()}"
                raise ConfigError(f"${key} is not a setting (sections and fields are separated by two "
                                  f"underscores: ${hint})", remedy=f"rename it to {hint}, or unset it")
            logger.warning("$%s is not a setting htrctl knows; ignored (settings are %sSECTION__FIELD)",
                           key, ENV_PREFIX)
            continue
        section, _, field = key[len(ENV_PREFIX):].lower().partition("__")
        if raw == NULL:
            value = None
        elif field in _RAW_FIELDS:
            value = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else None
            except yaml.YAMLError:
                value = raw
        out.setdefault(section, {})[field] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _allowed(section: str, field: str) -> str | None:
    sec = Settings.model_fields.get(section)
    if sec is None:
        return ", ".join(k for k in Settings.model_fields if k != "source")
    model = sec.annotation
    if field == "":
        return None
    fields = getattr(model, "model_fields", {})
    if field not in fields:
        return ", ".join(fields)
    return None


def _format_validation(err: ValidationError, source: str, env_keys: set[str]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        origin = source
        if e["loc"] and len(e["loc"]) >= 2:
            env_name = f"{ENV_PREFIX}{e['loc'][0]}__{e['loc'][1]}".upper()
            if env_name in env_keys:
                origin = f"${env_name}"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parts = [str(p) for p in e["loc"]]
            allowed = _allowed(parts[0], parts[1] if len(parts) > 1 else "") if len(parts) <= 2 else None
            if len(parts) == 1:
                allowed = _allowed("", "")
            msg = "unknown setting" + (f" (allowed: {allowed})" if allowed else "")
        elif e["type"] == "literal_error":
            msg = "invalid value " + repr(e.get("input")) + ": " + msg.replace("Input should be", "allowed:")
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{origin}: {loc or '<top>'}: {msg}")
    return "; ".join(lines)


def load_settings(path: str | os.PathLike | None = None, *, env: dict | None = None) -> Settings:
    """Load, merge and validate the settings (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    cfg_path = resolve_config_path(path, env)
    data: dict[str, Any] = {}
    source = "<defaults>"
    if cfg_path is not None:
        source = str(cfg_path)
        try:
            text = cfg_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read: {exc}", remedy="check the file's permissions and encoding") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(
                f"{source}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}",
                remedy="fix the syntax (`htrctl config template` prints every setting)",
            ) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections, not {type(loaded).__name__}")
        data = loaded
    overrides = _env_overrides(env)
    env_keys = {k.upper() for k in env if k.startswith(ENV_PREFIX)}
    data = _merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            "invalid configuration: " + _format_validation(exc, source, env_keys),
            remedy="`htrctl config template` prints every setting, its default and allowed values",
        ) from exc
    settings.source = source
    return settings


def host_problems(settings: Settings) -> list[ConfigError]:
    """What the settings need from this host that it lacks: htrd would exit 78 on it at start.

    Today: ``socket.group`` must exist (htrd gives its socket to that group).
    ``htrctl config check`` and ``htrctl doctor`` report these.
    """
    import grp

    problems: list[ConfigError] = []
    group = settings.socket.group
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            problems.append(ConfigError(
                f"{settings.source}: socket.group: group '{group}' does not exist on this host (htrd would exit 78)",
                remedy=f"create it (sudo groupadd --system {group}; `sudo htrctl service install` does), "
                       "or set socket.group: null"))
    return problems


def dump_settings(settings: Settings) -> str:
    """The effective settings as YAML (``htrctl config show``)."""
    data = settings.model_dump(mode="json")
    data["socket"]["mode"] = oct(settings.socket.mode)
    return yaml.safe_dump(data, sort_keys=False)
