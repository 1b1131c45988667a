"""The wire protocol between ``htrctl`` (client) and ``htrd`` (server).

One module, imported by both sides: paths, request/response models, the error
envelope and its types. HTTP/1.1 over a Unix socket; ``curl --unix-socket
/run/htr/htr.sock http://htr/v1/status`` works.

Transcription requests carry image *bytes*, never a path: the daemon never
opens a file a client names.

- ``POST /v1/transcribe`` -- the body is one image file (PNG, JPEG, TIFF,
  WebP; multi-page TIFF gives one result per page). Optional query parameter
  ``max_new_tokens``; optional header ``X-Request-Id``.
- ``POST /v1/transcribe/batch`` -- ``multipart/form-data`` with one or more
  parts named ``image`` (e.g. the lines of a page); one item per part, in
  order, each with its results or its own error.

Errors always use :class:`ErrorEnvelope`; 503 responses carry ``Retry-After``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

API_PREFIX = "/v1"
PATH_LIVE = "/v1/live"
PATH_READY = "/v1/ready"
PATH_STATUS = "/v1/status"
PATH_TRANSCRIBE = "/v1/transcribe"
PATH_TRANSCRIBE_BATCH = "/v1/transcribe/batch"
PATH_METRICS = "/metrics"
PATH_OPENAPI = "/openapi.json"

HEADER_REQUEST_ID = "X-Request-Id"
BATCH_PART_NAME = "image"
# The Host header the client sends; any value works over a Unix socket.
BASE_URL = "http://htr"

# The daemon's readiness states, in the order a start goes through them (htrd.state holds the transitions).
STARTING, LOADING, WARMING, READY, DRAINING, FAILED = "starting", "loading", "warming", "ready", "draining", "failed"
STATES: tuple[str, ...] = (STARTING, LOADING, WARMING, READY, DRAINING, FAILED)
State = Literal[STATES]  # the same names, as the type the models validate and the schema lists

# The error envelope's types, each with the HTTP status it is answered with.
ERROR_STATUS: dict[str, int] = {
    "bad_request": 400,  # malformed request (also 405)
    "not_found": 404,  # no such endpoint
    "bad_image": 422,  # not an image, truncated, unsupported mode (also 415)
    "too_large": 413,  # body or pixel limit exceeded
    "queue_full": 503,  # backpressure (+ Retry-After)
    "not_ready": 503,  # starting / loading / warming / draining / failed (+ Retry-After)
    "deadline_exceeded": 504,  # request deadline passed
    "out_of_memory": 507,  # CUDA OOM for this request; the daemon stays ready
    "internal": 500,  # a bug
}
ErrorType = Literal[tuple(ERROR_STATUS)]


class ErrorBody(BaseModel):
    type: ErrorType
    message: str
    detail: dict | list | str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class Timings(BaseModel):
    queue_ms: float = 0.0
    preprocess_ms: float = 0.0
    generate_ms: float = 0.0
    total_ms: float = 0.0


class PageResult(BaseModel):
    page: int = Field(0, description="0 for single images; the TIFF page index otherwise")
    text: str
    tokens: int = Field(0, description="generated tokens")
    batch_size: int = Field(1, description="size of the generate batch this page ran in")
    timings: Timings = Timings()


class TranscribeResponse(BaseModel):
    request_id: str
    model_digest: str | None = None
    results: list[PageResult]


class BatchItem(BaseModel):
    index: int
    filename: str | None = None
    results: list[PageResult] | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    request_id: str
    model_digest: str | None = None
    items: list[BatchItem]


class ReadyResponse(BaseModel):
    state: State
    detail: str | None = None


class GpuInfo(BaseModel):
    device: str  # "cpu" or "cuda:0"
    uuid: str | None = None
    name: str | None = None
    memory_total_bytes: int | None = None
    memory_allocated_bytes: int | None = None
    memory_reserved_bytes: int | None = None


class Counters(BaseModel):
    requests: int = 0
    images: int = 0
    errors: int = 0
    rejected_queue_full: int = 0
    deadline_exceeded: int = 0
    batches: int = 0
    generated_tokens: int = 0


class EngineInfo(BaseModel):
    """How htrd decodes: the generator, its slots (lines decoding at once) and their KV cache."""

    generator: str | None = None  # "fast" (continuous batching over a static KV cache) | "plain" (HF generate)
    slots: int | None = None
    slots_occupied: int | None = None
    avg_occupied_slots: float | None = None  # over every decode step since READY
    decode_steps: int | None = None  # decode steps since READY (the plain generator: tokens of its batches)
    decode_checks: int | None = None  # host checks (each a wait for the GPU) those steps took; fast path only
    # From a host check to the next GPU launch while lines run, in total: the GPU has nothing queued meanwhile
    turnaround_total_ms: float | None = None
    turnarounds: int | None = None  # how many such gaps (turnaround_total_ms / turnarounds: one on average)
    occupied_slot_steps: int | None = None  # sum over those steps of the lines decoding
    kv_cache_bytes: int | None = None
    # fast path: "triton" | "flash" (a decode step reads each line's own keys; htrd.attention) | "sdpa" (the
    # masked span; CPU, older GPUs)
    decode_attention: str | None = None
    # fast path: "triton" (the MLP's SiLU(gate) x up as one kernel; htrd.activation) | "compiled" | "eager"
    mlp_activation: str | None = None
    preprocess_ms_per_image: float | None = None  # CPU time to decode + preprocess one line, on average
    preprocess_workers: int | None = None
    preprocess_in: str | None = None  # "processes" (htrd.prepool, the default) | "threads" (preprocess_workers: 0)
    # times the preprocessing worker processes were started anew (one died: a decoder crash, a hung file, OOM)
    preprocess_restarts: int | None = None
    # fast path: "mixed" (prompts prefilled in chunks inside the decode steps; GPUs with flash attention, the
    # CPU) | "packed" (prompts back to back apart from the decode steps, where the mixed steps' check failed) |
    # "left-padded" (each prefill group padded to its longest prompt; older GPUs)
    prefill_layout: str | None = None
    prefill_tokens_per_step: int | None = None  # mixed steps: most prompt tokens one step prefills
    mixed_steps: int | None = None  # decode steps that prefilled prompt tokens too, since start
    prefill_waiting: int | None = None  # mixed steps: lines joined whose prompts are not wholly prefilled yet
    prefill_packed_graphs: int | None = None  # packed prefills' language model captured per padded token count
    prefill_graphs: int | None = None  # small prefills of a recurring shape captured as CUDA graphs (kept now)
    # small prefills' language-model part captured per (lines, prompt width padded to 64) (kept now)
    prefill_lm_graphs: int | None = None
    # prefills' vision tower captured per patch rows padded to 256 (kept now; small prefills only when left-padded)
    prefill_vision_graphs: int | None = None
    prefill_replays: int | None = None  # prefills whose language model (or all) was a replayed graph, since start
    # new prefill shapes whose capture without an eager run first failed (each then ran eagerly), since start
    prefill_direct_capture_failures: int | None = None
    prefill_precaptured: int | None = None  # prefill graphs captured while quiet, ahead of need, since start
    # Where start -> READY went: loading the model onto the device, then warming up (every shape served), of
    # which capturing the decode step's CUDA graphs (how many)
    load_s: float | None = None
    warmup_s: float | None = None
    warmup_graphs: int | None = None
    warmup_graphs_s: float | None = None


class StatusResponse(BaseModel):
    version: str
    state: State
    detail: str | None = None
    pid: int
    uptime_s: float
    model_dir: str
    model_variant: str | None = None  # "merged" | "adapter"
    manifest_digest: str | None = None
    gpu: GpuInfo
    queue_depth: int = 0
    queue_capacity: int = 0
    in_flight: int = 0
    batch_sizes: list[int] = []
    counters: Counters = Counters()
    engine: EngineInfo = EngineInfo()
