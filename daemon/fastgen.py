"""The fast generator: merged weights, a static KV cache with slots, continuous batching, CUDA-graph decoding.

What the engine gets from :class:`FastGenerator` compared with the naive
``base + PeftModel + generate`` path (DESIGN.md, "Reference measurements"):

- **Merged LoRA** (:func:`htrd.model.load_model` folds the adapter in, or loads
  ``merged/``): decoding runs plain linear layers.
- **Slots.** The KV cache holds ``slots`` lines (the largest of
  ``limits.batch_sizes``) of up to ``max_cache_len`` tokens each. A line joins
  the running decode batch at a step boundary into a free slot, and leaves at
  its EOS or its own ``max_new_tokens``, freeing the slot at once; a one-word
  line never waits for a long one.
- **Mixed steps** (``mixed=True``, ``generation.mixed_steps``; where flash
  attention's variable-length kernel runs and passes its check, and on the
  CPU -- off by default: on an H200 not faster yet, see the README). A joining
  line's prompt is not prefilled apart: its input embeddings (text tokens embedded, the vision
  tower's image tokens and deepstack features) wait in a staging ring, and
  each decode step takes up to ``prefill_tokens`` (512) of the waiting prompt
  tokens, in FIFO order, along with the running lines' decode rows -- one
  forward over both (:meth:`_mixed_step`): the weights are read once for a
  step's prompt chunk and every running line's next token, and the running
  lines never stall behind a whole prefill. A prompt may span steps; each
  chunk attends to its line's earlier positions in the cache
  (:func:`htrd.attention.cache_attention`: flash attention's variable-length kernel, every
  (line, KV head) a sequence over the head-major cache, chunks aligned
  bottom-right; the decode rows in a call of their own, as in a decode step).
  The step that takes a prompt's last token chooses the line's first token;
  the line decodes from the next. Shapes depend on (decode rows, budget)
  only: one CUDA graph per pair, captured before READY (budgets of 1/4 .. 4/4
  of ``prefill_tokens``, decode rows of each batch size). The host
  side -- the FIFO, the ring, each step's chunks -- is :mod:`htrd.chunks`.
  Where mixed steps are off, newcomers are prefilled together between decode
  steps (at most ``prefill_chunk`` at a time), as below.
- **A captured decode step.** Every slot keeps its own cache index, rope offset,
  token count and limits on the device. One decode step -- embedding, the
  layers, the LM head, greedy argmax, EOS and limit bookkeeping -- reads and
  writes only fixed buffers over slots ``[:B]``, attending over cache
  positions ``[:L]``; on CUDA it is captured once per (B bucket, L bucket) as a
  CUDA graph before READY and replayed: one launch per token. On the CPU the
  same step runs eagerly (what the tests exercise).
- **A fused prefill that never waits for the GPU.** The vision tower
  (:class:`htrd.vision.VisionTower`: HF's modules on per-grid cached inputs)
  turns the patches into image tokens and deepstack features; everything
  around it is known on the host (:func:`htrd.model.prompt_layout`: M-RoPE
  positions from HF's own ``get_rope_index``, cached per image grid; where the
  image tokens go; each image's patch count), so nothing asks the GPU for a
  shape. The language model over the prompt runs on the decode step's fused
  weights and ops (~10 kernels a layer) and writes keys and values straight
  into the slots; no cache is copied afterwards.
- **Prefills launched behind the decode steps.** :meth:`step` calls the engine
  back (*during*) once the steps are queued on the GPU and before it waits for
  them; newcomers' prefills are launched there, so the host's launching
  overlaps the decoding. Nothing in a prefill waits for the GPU.
- **Packed prefills.** Where flash attention's variable-length kernel runs (and
  on the CPU), a prefill's prompts go back to back, each from cache position 0:
  no padding work, causal attention per line, keys and values written by one
  index_copy per layer. The language model's part is replayed from a CUDA
  graph per padded token count (:func:`_pack_width`: at most 12.5 % padding),
  captured on its first prefill -- a prefill of any number of lines is a few
  launches. Eagerly, a prefill launches ~1,000 kernels from Python: on an H200
  under 64 clients, groups of 5-7 lines kept the GPU busy under half the time
  they took. The vision tower runs over the patches padded to 256-row buckets
  and is replayed per padded row count, whatever the number of lines (eagerly,
  lines of many sizes attended in one call per size and layer).
- **Replayed small prefills** (GPUs without that kernel: prompts left-padded to
  the group's longest). A prefill of a few lines is bound by the host
  launching ~1,500 kernels. Its prompts are padded to 64-position buckets and
  the language model's part is captured per (lines, padded width); its patches
  are padded to 256-row buckets and the vision tower is captured per padded
  row count -- each on its key's first occurrence, so lines of any size
  reuse a few dozen graphs. When the exact shape (width, image grids) comes
  back a third time the whole prefill is captured as one graph (the warm-up
  line's shapes before READY). Graphs are kept: a full cache captures no more
  (dropping old graphs would re-capture on every prefill of many shapes).
- **Decode attention reads only the keys in use.** On a GPU each (slot, KV
  head) is its own sequence from its first prompt position to its current one
  (:mod:`htrd.attention`: Triton's kernel, the head's query heads together;
  else flash attention's variable-length kernel), so a step reads each line's
  keys, not the span bucket's for every slot (a 2,000-px line in the batch made
  every slot's attention read ~1,000 positions). Elsewhere SDPA with an
  additive mask over the span.
- **SDPA attention** in left-padded prefills and the vision tower (without its
  cuDNN backend, which plans every new shape: see :func:`_no_cudnn_attention`);
  optionally the elementwise ops (norms, rotary, SiLU) compiled with
  ``torch.compile`` (``compile=True``; one graph per op serves decode steps and
  prefills, :class:`_Ops`), with inductor/triton caches in a persistent
  directory; htrd compiles them while the weights load (:func:`precompile_ops`).

Greedy decoding gives ``model.generate(do_sample=False)``'s tokens on the same
weights (tests/test_fastgen.py checks it against the naive path on the demo
model, in fp32, alone, batched and joining a running batch midway).

Nothing here imports torch at module level; the engine imports this module
only after the GPU is pinned.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from htrctl.modeldir import KV_RESERVE_FRACTION, slots_that_fit

from .activation import silu_mul as triton_silu_mul
from .activation import silu_mul_ok
from .attention import (
    cache_attention,
    decode_splits,
    flash_decode,
    flash_decode_ok,
    kernel_agrees,
    kv_rows,
    kv_spans,
    packed_attention,
    sdpa_decode,
    triton_decode,
    triton_decode_ok,
)
from .chunks import PrefillQueue, StepPlan
from .generation import Finished, GeneratorBase, Seq
from .model import (
    DEFAULT_PROMPT,
    Prepared,
    Preprocessor,
    PromptLayout,
    _first_line,
    has_flash_varlen,
    image_batch,
    image_grids,
    load_model,
    prompt_layout,
    to_device,
)
from .vision import ROW_BUCKET, VisionTower

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # limits.batch_sizes' default
LENGTH_BUCKET = 64  # the cache's positions per slot are a multiple of this
DECODE_ATTENTION = ("auto", "triton", "flash", "sdpa")  # generation.decode_attention (see _decode_attention)
# Without flash attention (SDPA over a masked span), attention spans (cache positions a decode step reads) are
# multiples of this, capped at the cache's length: one CUDA graph per (batch size, span), each ~0.5 s to capture
# on an H200 -- 4 spans for a 1024-position cache instead of 8, for at most 255 masked positions read per line
# and step. With flash attention a step reads each line's own keys: one span, the whole cache.
SPAN_BUCKET = 256
STEPS_PER_CALL = 4  # decode steps between host checks (finished lines, deadlines, newcomers)
# Up to this many running lines, step() stops at the nearest line's last token (latency: a lone 50-token line
# is answered after 49 steps, not 52). Beyond, it runs STEPS_PER_CALL steps per host check (throughput: lines
# of varied lengths end nearly every step, and each check waits for the GPU and for the GIL).
STOP_AT_LAST_TOKEN_LINES = 4
DEFAULT_PREFILL_CHUNK = 16
# Mixed steps (see the module docstring): at most this many prompt tokens ride along with the decode rows of one
# step, in MIXED_BUDGETS buckets of it (a step takes the smallest bucket that holds what is waiting). One step of
# 128 decode rows and 512 prompt tokens is ~640 rows through the weights: GEMMs well past the weight-streaming
# floor, a running line's token ~2x a pure decode step's time.
DEFAULT_PREFILL_TOKENS = 512
MIXED_BUDGETS = 4  # budgets: 1/4, 2/4, 3/4 and all of prefill_tokens
# A prefill of at most this many lines is launch-bound (one line: ~50 ms of host launches for ~19 ms of GPU
# work on an H200); when its exact shape (prompt length, image grids) recurs, it is captured as a CUDA graph and
# replayed. Larger prefills keep the GPU busy on their own.
PREFILL_GRAPH_LINES = 4
# Whole-prefill graphs kept: the first shapes to recur. A full cache captures no more and drops none -- with
# more recurring shapes than room, dropping the least recently used would re-capture (an eager prefill plus
# a capture) on nearly every prefill; the shapes without a whole graph replay the two parts' graphs instead.
PREFILL_GRAPHS = 48
# Captured on the shape's third prefill: lines of varied sizes (most shapes seen once or twice) must not pay a
# capture -- another launch of the whole prefill plus instantiation -- that no replay pays back.
PREFILL_GRAPH_AFTER = 3
# Prompts of a small prefill are left-padded to a multiple of this, and the language model's part of the prefill
# (everything after the vision tower) is captured per (lines, padded width) on that shape's LM_GRAPH_AFTER-th
# prefill (the first: a capture costs about one eager prefill, and the few dozen keys recur all day).
PREFILL_BUCKET = 64
LM_GRAPH_AFTER = 1
# The vision tower of a prefill (any number of lines when packed; small left-padded ones) runs over patches
# padded to 256-row buckets (VisionTower.padded, the attention blocks' boundaries padded to the prefill chunk),
# captured per padded row count on that count's first prefill: with the language model's graphs, lines of any
# sizes are prefilled by two replays once their buckets have been seen. Kept like the whole graphs (none
# dropped): room for 16 lines of up to ~1,500 patches (a 2,000 x 128 px line has ~1,000).
VISION_GRAPHS = 96
# Packed prefills (every prompt back to back, flash attention per line): padded to _pack_width tokens, at least
# this many; the language model's part is one CUDA graph per padded width.
PACK_MIN = 64
PACKED_BUFFER_TOKENS = 4096  # the packed graphs' static inputs are sized for this many tokens at first
# precapture_next: prefills of up to prefill_chunk lines of this many prompt tokens (a 2,000-px line: ~400)
PRECAPTURE_LINE_TOKENS = 512
# ... while at least this share of the GPU's memory is free: half of KV_RESERVE_FRACTION, the room left for
# prefill activations -- the graphs' pool holds exactly those (a replay allocates nothing), and the other half
# stays for what runs uncaptured (a first-sight capture, an overlong line's eager path)
PRECAPTURE_MIN_FREE = KV_RESERVE_FRACTION / 2


def configure_compile_cache(cache_dir: str | os.PathLike | None) -> Path | None:
    """Point inductor's and triton's on-disk kernel caches at *cache_dir* (``inductor/``, ``triton/``).

    Must run before torch compiles anything. Variables already set in the
    environment (htr.service sets them under /var/lib/htr) win. Returns the
    directory, or None when *cache_dir* is None (then the environment or
    torch's default decides).
    """
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    if cache_dir is None:
        return None
    root = Path(cache_dir)
    (root / "inductor").mkdir(parents=True, exist_ok=True)
    (root / "triton").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    return root


def kv_bytes_per_slot(model, max_cache_len: int) -> int:
    """Bytes of keys and values one slot of *max_cache_len* positions takes."""
    tcfg = model.config.text_config
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * tcfg.num_hidden_layers * tcfg.num_key_value_heads * head_dim * _round_up(max_cache_len, LENGTH_BUCKET) * elem


class _Graph:
    __slots__ = ("batch", "graph", "length")

    def __init__(self, graph, batch: int, length: int):
        self.graph = graph
        self.batch = batch
        self.length = length


class _PrefillGraph:
    """A captured prefill of one shape: its static inputs, its output, and what it reads besides."""

    def __init__(self, graph, inputs: list, out, keep: list) -> None:
        self.graph, self.inputs, self.out, self.keep = graph, inputs, out, keep


class FastGenerator(GeneratorBase):
    """Continuous greedy batching over the slots of a static KV cache (see the module docstring).

    Not thread-safe: one thread (the engine's inference thread) calls
    :meth:`add`, :meth:`step` and :meth:`warmup`; :meth:`prepare` may be
    called from any thread.
    """

    variant: str = "merged"

    def __init__(
        self,
        model,
        processor,
        *,
        prompt: str = DEFAULT_PROMPT,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        max_cache_len: int = 1024,
        max_new_tokens: int = 256,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        mixed: bool = False,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        decode_attention: str = "auto",
        preprocessor: Preprocessor | None = None,
    ) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.processor = processor
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pre = preprocessor or Preprocessor(processor, model, prompt=prompt,
                                                one_cpu_thread=self.device.type == "cuda")
        self.prompt = self.pre.prompt
        self.max_new_tokens = int(max_new_tokens)
        self.max_cache_len = _round_up(int(max_cache_len), LENGTH_BUCKET)
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        self.compile = bool(compile)
        self.batch_sizes = self._fit_slots(sorted({int(b) for b in batch_sizes}))
        self.slots = self.max_batch = self.batch_sizes[-1]

        cfg = model.config
        tcfg = cfg.text_config
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        self.layers = list(self.text.layers)
        self.n_heads = tcfg.num_attention_heads
        self.n_kv = tcfg.num_key_value_heads
        self.head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
        self.eps = float(tcfg.rms_norm_eps)
        self.eos_ids, self.pad_id = self.pre.eos_ids, self.pre.pad_id

        # Host-side view of the slots (the device holds the rest).
        self._seqs: list[Seq | None] = [None] * self.slots
        self._free = list(range(self.slots))  # a heap: the lowest free slot first keeps B small
        self._need = [0] * self.slots  # prompt + max_new: the cache span the line can reach
        self._left = [0] * self.slots  # decode steps until the line's max_new_tokens (EOS may end it sooner)
        self._group = [1] * self.slots
        self._prefill_ms = [0.0] * self.slots
        self._prefill_end = [0.0] * self.slots
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None
        self._host = None  # pinned host copies of a step's results (see _results)
        self._missing_graphs: set[tuple[int, int]] = set()
        self.steps_run = 0
        self.step_calls = 0  # host checks (step() calls that ran steps): steps_run / step_calls steps per check
        # Host turnaround: from a check that waited for the GPU (lines still running) to the next GPU launch.
        self.turnaround_s, self.turnarounds = 0.0, 0
        self._idle_since: float | None = None
        self.occupied_sum = 0  # sum over steps of running lines (average occupancy = occupied_sum / steps_run)
        self._prefill_graphs: dict[tuple, _PrefillGraph] = {}
        self._prefill_seen: OrderedDict[tuple, int] = OrderedDict()
        self._prefill_graphs_ok = self.cuda_graphs
        self._lm_graphs: dict[tuple[int, int], _PrefillGraph] = {}
        self._lm_seen: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._lm_buffers: list = []  # the language-model graphs' static inputs (_static_inputs)
        self.lm_graph_limit = PREFILL_GRAPH_LINES * -(-self.max_cache_len // PREFILL_BUCKET)  # every key fits
        self._vision_graphs: dict[tuple[int, int], _PrefillGraph] = {}  # per (padded patch rows, span)
        self._vision_buffers: list = []  # the vision graphs' static inputs
        self._vision_out_buf: list = [None, None]  # their shared output (_vision_out): the buffer, the last view
        self.prefill_replays = 0
        self.vision_replays = 0
        self.direct_capture_failures = 0  # new prefill shapes whose capture without an eager run failed (_record)
        self.precaptured = 0  # prefill graphs captured ahead of need (precapture_next)
        self._precapture_plan: list[tuple[str, int]] | None = None
        self._packed_graphs: dict[int, _PrefillGraph] = {}
        self._packed_buffers: list = []  # the packed prefill graphs' static inputs
        self._alloc_state()
        # Decode attention: "triton" (each (slot, KV head)'s own keys, g query heads at once; htrd.attention),
        # "flash" (its own keys through flash attention's variable-length kernel) or "sdpa" (masked span).
        self.decode_attention = self._decode_attention(decode_attention)
        self._sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                     if self.device.type == "cuda" else 2)
        # Prefills packed (every prompt's tokens back to back, no padding) where flash attention's variable-length
        # kernel runs and passes its check, and on the CPU (attention per line). Elsewhere each group is
        # left-padded to its longest prompt.
        self.packed = self.device.type == "cpu" or (has_flash_varlen(self.k_cache[0]) and self._packed_attention_ok())
        # Mixed steps (prompts chunked into the decode steps), when asked for, where packed prefills run and the
        # cache attention they need passes its check; elsewhere newcomers are prefilled between decode steps.
        self.mixed = bool(mixed) and self.packed and self._mixed_attention_ok()
        self.prefill_budgets = _budgets(int(prefill_tokens), self.max_cache_len)
        ring = max(self.prefill_chunk * PRECAPTURE_LINE_TOKENS, self.max_cache_len, self.prefill_budgets[-1])
        self._prefills = PrefillQueue(ring=ring, budget=self.prefill_budgets[-1], max_lines=self.prefill_chunk)
        self._mixed_graphs: dict[tuple[int, int], _Graph] = {}
        self._mixed_buffers: dict[int, object] = {}  # per budget: the mixed step's static inputs (_mixed_inputs)
        self.mixed_steps = 0
        self._failed: list[Finished] = []  # lines whose staging failed, answered by the next add() or step()
        self._fuse_weights()
        self.vision = VisionTower(self.model.model.visual, compile=self.compile)
        self._alloc_staging(ring)
        self._ops = _ops(torch, compile=self.compile)
        # The MLP's SiLU(gate) x up: one Triton kernel where it runs and passes its check (htrd.activation), else
        # the compiled op (inductor's kernel for it took 2.4x the time at a decode step's rows on an H200).
        inter = self._gu_w[0].shape[0] // 2
        if silu_mul_ok(inter=inter, device=self.device, dtype=self.dtype):  # GPUs (the CPU: Triton's interpreter)
            self.mlp_activation, self._silu_mul = "triton", triton_silu_mul
        else:
            self.mlp_activation = "compiled" if self.compile else "eager"
            self._silu_mul = self._ops.silu_mul
        logger.info("decode attention: %s; MLP activation: %s", self.decode_attention, self.mlp_activation)
        self._step_fn = self._decode_step

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, device: str = "cuda", dtype: str = "auto", variant: str = "auto",
             **kwargs) -> FastGenerator:
        """Load through :func:`htrd.model.load_model` (adapter merged) and build the generator."""
        loaded = load_model(model_dir, device=device, dtype=dtype, variant=variant, merge=True)
        gen = cls(loaded.model, loaded.processor, **kwargs)
        gen.variant = loaded.variant
        return gen

    # ------------------------------------------------------------------- state
    def _fit_slots(self, sizes: list[int]) -> list[int]:
        """The batch sizes whose KV cache fits beside the model in the device's free memory (less
        KV_RESERVE_FRACTION of it, for activations): the largest is the number of slots. The default sizes go
        up to 256 -- as many slots as the GPU holds -- so serving fewer than configured is normal (logged),
        and only a cache that fits not even the smallest size is an error."""
        self.kv_cache_bytes_per_slot = kv_bytes_per_slot(self.model, self.max_cache_len)
        if self.device.type == "cuda":
            free, total = self.torch.cuda.mem_get_info(self.device)
            where = "the GPU's"
        else:  # the CPU: host memory (a 256-slot cache of the 8B model in fp32 is ~77 GiB)
            import psutil

            mem = psutil.virtual_memory()
            free, total = mem.available, mem.total
            where = "the host's available"
        fits = slots_that_fit(sizes, self.kv_cache_bytes_per_slot, free, total)
        if not fits:
            from htrctl.errors import GpuError

            raise GpuError(f"the KV cache for even {sizes[0]} line(s) of generation.max_cache_len="
                           f"{self.max_cache_len} ({sizes[0] * self.kv_cache_bytes_per_slot / 2**30:.2f} GiB) does "
                           f"not fit in {where} {free / 2**30:.1f} GiB free memory",
                           remedy="lower generation.max_cache_len, or free the GPU (htrctl doctor)")
        if len(fits) < len(sizes):
            logger.info("KV cache: %d slots x %d positions (%.1f GiB) would not fit in %s %.1f GiB free memory "
                        "(less %.0f %% kept for activations): serving %d slots, the largest of limits.batch_sizes "
                        "that fits", sizes[-1], self.max_cache_len, sizes[-1] * self.kv_cache_bytes_per_slot / 2**30,
                        where, free / 2**30, KV_RESERVE_FRACTION * 100, fits[-1])
        return fits

    def _alloc_state(self) -> None:
        torch = self.torch
        dev, S, L = self.device, self.slots, self.max_cache_len
        shape = (S, self.n_kv, L, self.head_dim)
        # Each layer's cache is one allocation of its rows of head_dim plus one scratch row, where a packed
        # prefill's padding tokens write their keys and values (see _packed_layers).
        flat = [[torch.zeros((math.prod(shape) + self.head_dim,), dtype=self.dtype, device=dev) for _ in self.layers]
                for _ in range(2)]
        self._k_rows, self._v_rows = ([f.view(-1, self.head_dim) for f in fs] for fs in flat)
        self.k_cache, self.v_cache = ([f[:-self.head_dim].view(shape) for f in fs] for fs in flat)
        self._scratch_row = S * self.n_kv * L
        # Per-slot state has one row more than the slots: row S is a mixed step's dummy target (the padding
        # entries of its finishing lines write there).
        # Which cache positions a slot sees: SDPA's mask (decode steps without flash attention keep it current).
        self.attend = torch.zeros((S + 1, L), dtype=torch.bool, device=dev)
        self.attend[:, 0] = True  # a free slot sees one position: no all-masked softmax
        self.tok = torch.zeros((S + 1, 1), dtype=torch.long, device=dev)  # last token, input of the next step
        self.pos = torch.zeros((S + 1,), dtype=torch.long, device=dev)  # cache position of self.tok
        # First cache position a slot attends to (0 for a packed prefill; a left-padded prompt starts where its
        # group's padding ends): the slot sees positions [kv_first, pos] -- what self.attend marks, as offsets for
        # flash attention.
        self.kv_first = torch.zeros((S + 1,), dtype=torch.long, device=dev)
        self.cu_q = torch.arange(S * self.n_kv + 1, dtype=torch.int32, device=dev)  # one query per (slot, head)
        self.delta = torch.zeros((S + 1,), dtype=torch.long, device=dev)  # rope position - cache position
        self.nstep = torch.zeros((S + 1,), dtype=torch.long, device=dev)  # tokens produced so far
        self.lim_max = torch.ones((S + 1,), dtype=torch.long, device=dev)  # the line's max_new_tokens
        self.lim_min = torch.zeros((S + 1,), dtype=torch.long, device=dev)  # the line's min_new_tokens
        self.finished = torch.ones((S + 1,), dtype=torch.bool, device=dev)
        self.out = torch.zeros((S + 1, self.max_new_tokens + 1), dtype=torch.long, device=dev)  # generated tokens
        self.rows = torch.arange(S, dtype=torch.long, device=dev)
        self.rows_l = torch.arange(L, dtype=torch.long, device=dev)  # cache positions
        self.kv_heads = torch.arange(self.n_kv, dtype=torch.long, device=dev)
        self._true = torch.ones((), dtype=torch.bool, device=dev)
        self.eos = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)
        vocab = self.lm_head.weight.shape[0]
        self.eos_bias = torch.zeros((vocab,), dtype=torch.float32, device=dev)
        self.eos_bias[self.eos] = float("-inf")
        self.kv_cache_bytes = 2 * len(self.layers) * math.prod(shape) * self.k_cache[0].element_size()
        logger.info("static KV cache: %d slots x %d positions, %.2f GiB", S, L, self.kv_cache_bytes / 2**30)

    def _decode_attention(self, wanted: str) -> str:
        """The decode steps' attention kernel (:mod:`htrd.attention`): *wanted* ("auto", "triton", "flash" or
        "sdpa") where it runs and passes its start-up check; "auto" -- and a kernel that cannot run or fails --
        the first of triton, flash, sdpa that does. SDPA always runs."""
        if wanted not in DECODE_ATTENTION:
            raise ValueError(f"decode attention {wanted!r}: one of {', '.join(DECODE_ATTENTION)}")
        order = ["triton", "flash", "sdpa"]
        if wanted != "auto":
            order.remove(wanted)
            order.insert(0, wanted)
        for kind in order:
            if self.decode_attention_runs(kind):
                if wanted not in ("auto", kind):
                    logger.warning("decode attention %s does not run here: %s instead", wanted, kind)
                return kind
        raise AssertionError("unreachable: sdpa always runs")

    def decode_attention_runs(self, kind: str) -> bool:
        """Whether the decode attention *kind* ("triton", "flash", "sdpa") runs here and passes its start-up
        check (benchmarks compare every kind that does)."""
        shape = {"n_kv": self.n_kv, "g": self.n_heads // self.n_kv, "head_dim": self.head_dim, "device": self.device,
                 "dtype": self.dtype, "span": 2 * LENGTH_BUCKET}
        checks = {"triton": triton_decode_ok, "flash": flash_decode_ok, "sdpa": lambda **_: True}
        return checks[kind](**shape)

    def _packed_attention_ok(self) -> bool:
        """Whether packed prefills may attend with flash attention's variable-length kernel
        (:func:`htrd.attention.packed_attention`): checked on small random rows (sequences of several lengths, an empty one,
        values strided as the fused projection leaves them) against SDPA over all rows with a block-diagonal
        causal mask, relative norm of the difference <= 1 %. Where it fails or differs (another torch whose
        kernel reads its bounds otherwise): logged, and prompts are left-padded to their group's longest."""
        torch = self.torch
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        bounds = [0, 5, 37, 40, 61, 64, 64]
        T = bounds[-1]
        gen = torch.Generator(device=self.device).manual_seed(0)
        qkv = torch.randn((T, (nh + 2 * nkv) * hd), generator=gen, device=self.device, dtype=self.dtype)
        q = qkv[:, : nh * hd].view(T, nh, hd)
        k = qkv[:, nh * hd : (nh + nkv) * hd].view(T, nkv, hd)
        v = qkv[:, (nh + nkv) * hd :].view(T, nkv, hd)
        seq = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=self.device),
                                      torch.tensor(bounds, device=self.device).diff())
        allowed = (seq[:, None] == seq[None]) & torch.ones((T, T), dtype=torch.bool, device=self.device).tril()
        bias = torch.zeros((T, T), dtype=torch.float32, device=self.device).masked_fill_(~allowed, float("-inf"))
        g = nh // nkv
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(0, 1), k.float().repeat_interleave(g, 1).transpose(0, 1),
            v.float().repeat_interleave(g, 1).transpose(0, 1), attn_mask=bias, scale=hd**-0.5).transpose(0, 1)
        cu = torch.tensor(bounds, dtype=torch.int32, device=self.device)
        return kernel_agrees(lambda: packed_attention(q, k, v, cu, span=T, scale=hd**-0.5), ref,
                              what="flash attention over packed prompts",
                              fallback="prompts are left-padded to their group's longest")

    # -------------------------------------------------------------- mixed steps
    def _mixed_attention_ok(self) -> bool:
        """Whether mixed steps may attend with flash attention's variable-length kernel over the cache
        (:func:`htrd.attention.cache_attention`: each (line, KV head) a sequence, a prompt chunk's queries causally aligned
        bottom-right to the line's keys so far): checked on a small random cache -- decode rows, chunks that
        start mid-prompt, an empty sequence, keys of slots out of order -- against the same attention per
        sequence with SDPA in fp32 on the CPU. On the CPU it is that reference: True."""
        if self.device.type != "cuda":
            return True
        torch = self.torch
        nkv, hd, g, M = self.n_kv, self.head_dim, self.n_heads // self.n_kv, 2 * LENGTH_BUCKET
        gen = torch.Generator(device=self.device).manual_seed(0)
        k, v = (torch.randn((4, nkv, M, hd), generator=gen, device=self.device, dtype=self.dtype) for _ in range(2))
        # (slot, first key position, queries, key end): decode rows, a chunk ending a 100-token prompt at 100,
        # a whole 37-token prompt, an empty sequence, 11 padding rows
        specs = [(1, 5, 1, 120), (0, 0, 1, 10), (2, 0, 60, 100), (3, 0, 37, 37), (1, 0, 0, 1), (0, 0, 11, 11)]
        cu_q, cu_k, used = [0], [], []
        for slot, first, nq, end in specs:
            for h in range(nkv):
                cu_q.append(cu_q[-1] + nq)
                cu_k.append((slot * nkv + h) * M + first)
                used.append(end - first)
        cu_k.append(4 * nkv * M)
        q = torch.randn((cu_q[-1], g, hd), generator=gen, device=self.device, dtype=self.dtype)
        args = [torch.tensor(a, dtype=torch.int32) for a in (cu_q, cu_k, used)]
        ref = cache_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), scale=hd**-0.5, cu_q=args[0],
                               cu_k=args[1], used=args[2], max_q=60, span=M)
        cu_qd, cu_kd, used_d = (a.to(self.device) for a in args)
        return kernel_agrees(lambda: cache_attention(q, k, v, scale=hd**-0.5, cu_q=cu_qd, cu_k=cu_kd, used=used_d,
                                                       max_q=60, span=M).cpu(),
                              ref, what="flash attention of prompt chunks over the KV cache",
                              fallback="newcomers are prefilled between decode steps")

    def _alloc_staging(self, ring: int) -> None:
        """The staging ring (see :mod:`htrd.chunks`): *ring* rows of input embeddings and of each deepstack
        layer's features, plus one zero row (a mixed step's padding tokens read it). Only with mixed steps."""
        torch = self.torch
        self._ring_zero = ring
        if not self.mixed:
            self._stage_h = self._stage_ds = None
            return
        H = self.text.embed_tokens.weight.shape[1]
        layers = len(getattr(self.model.model.visual, "deepstack_visual_indexes", ()) or ())
        self._stage_h = torch.zeros((ring + 1, H), dtype=self.dtype, device=self.device)
        self._stage_ds = torch.zeros((layers, ring + 1, H), dtype=self.dtype, device=self.device)
        logger.info("mixed steps: up to %d prompt tokens a step (budgets %s), staging for %d tokens (%.2f GiB)",
                    self.prefill_budgets[-1], self.prefill_budgets, ring,
                    (1 + layers) * (ring + 1) * H * self._stage_h.element_size() / 2**30)

    def _stage(self) -> None:
        """Lines that joined and wait for staging rows (:class:`htrd.chunks.PrefillQueue`): their prompts'
        input embeddings -- text tokens embedded, the vision tower's image tokens in place -- and deepstack
        features into the ring, in groups of at most ``prefill_chunk`` lines (the vision tower's graphs). Only
        launches GPU work."""
        staged = self._prefills.stage()
        for i in range(0, len(staged), self.prefill_chunk):
            group = staged[i : i + self.prefill_chunk]
            try:
                self._stage_group(group)
            except Exception as exc:  # noqa: BLE001 -- one bad line (an image the GPU has no room for) fails alone
                if len(group) == 1:
                    self._fail(group[0][0], exc)
                    continue
                logger.warning("staging %d joining lines failed (%s); staging them one by one", len(group),
                               _first_line(exc))
                for one in group:
                    try:
                        self._stage_group([one])
                    except Exception as exc1:  # noqa: BLE001
                        self._fail(one[0], exc1)

    def _fail(self, slot: int, exc: BaseException) -> None:
        """The line in *slot* could not be staged: out of the prefill queue, its slot free, and answered (by the
        next :meth:`add` or :meth:`step`) as finished with *exc* and no tokens."""
        logger.error("a joining line's prefill failed: %s", _first_line(exc))
        seq = self._seqs[slot]
        self._prefills.drop(slot)
        self._seqs[slot] = None
        heapq.heappush(self._free, slot)
        self._reset_slots([slot])
        self._failed.append(Finished(seq, [], group=self._group[slot], error=exc))

    def _take_failed(self) -> list[Finished]:
        failed, self._failed = self._failed, []
        return failed

    def _stage_group(self, group: list) -> None:
        """One group of :meth:`_stage`: (slot, first ring row, prompt length, Seq) per line; the vision tower
        over their images together (its graphs per padded patch rows), the embeddings into their rows."""
        torch = self.torch
        items = [item.prepared for _, _, _, item in group]
        batch = image_batch(items, device=self.device, dtype=self.pre.dtype)
        ids = torch.cat([it.input_ids for it in items])
        dest = torch.cat([torch.arange(start, start + n) for _, start, n, _ in group])
        index, off = [], 0
        for it in items:
            index.append(it.image_positions + off)
            off += it.prompt_len
        index = torch.cat(index)
        T, k = int(ids.shape[0]), int(index.shape[0])
        ids_d, dest_d, index_d = to_device(torch.cat([ids, dest, index]), self.device).split([T, T, k])
        lengths, grids = image_grids(items)
        layout = PromptLayout(position_ids=None, image_index=index_d, vision_lengths=lengths, grids=grids)
        with _no_cudnn_attention(torch):
            embeds, deepstack = self._prompt_inputs(ids_d, batch["pixel_values"], index_d, batch["image_grid_thw"],
                                                    layout, replay_vision=self._prefill_graphs_ok and self.vision.own)
        self._stage_h.index_copy_(0, dest_d, embeds.to(self.dtype))
        image_rows = dest_d.index_select(0, index_d)
        for li in range(self._stage_ds.shape[0]):
            self._stage_ds[li].index_fill_(0, dest_d, 0)
            if li < len(deepstack):
                self._stage_ds[li].index_copy_(0, image_rows, deepstack[li].to(self.dtype))

    def _budget_for(self, tokens: int) -> int:
        """The smallest budget (a mixed graph's prompt rows) that holds *tokens*."""
        for b in self.prefill_budgets:
            if b >= tokens:
                return b
        return self.prefill_budgets[-1]

    def _mixed_sizes(self, T: int) -> list[int]:
        """The parts of a mixed step's static inputs (one long tensor, :meth:`_mixed_host`) for *T* prompt
        rows: each row's ring row, slot, position, rope positions (3 rows); the queries' order for the cache
        attention and back; per (line, KV head) sequence its query bounds, first key row and key count
        (``prefill_chunk`` lines and the padding); per finishing line its row, slot and prompt length."""
        P, nkv = self.prefill_chunk, self.n_kv
        seqs = (P + 1) * nkv
        return [T, T, T, 3 * T, T * nkv, T * nkv, seqs + 1, seqs + 1, seqs, P, P, P]

    def _mixed_buffer(self, T: int):
        """The one long tensor on the device that holds the static inputs of every mixed step of budget *T*
        (allocated on first use); a step's inputs are copied into it whole (:meth:`_mixed_host`)."""
        buf = self._mixed_buffers.get(T)
        if buf is None:
            buf = self._mixed_buffers[T] = self.torch.zeros((sum(self._mixed_sizes(T)),), dtype=self.torch.long,
                                                            device=self.device)
        return buf

    def _mixed_inputs(self, T: int) -> list:
        """The static inputs of every mixed step of budget *T*: views of :meth:`_mixed_buffer`."""
        return list(self._mixed_buffer(T).split(self._mixed_sizes(T)))

    def _mixed_host(self, plan: StepPlan, T: int):
        """:meth:`_mixed_inputs`' values for *plan*, built on the host: the chunks' tokens back to back, then
        padding (the scratch slot, the ring's zero row) up to *T*. The queries of each (chunk, KV head) become
        consecutive rows for the cache attention (sequence-major); the padding is one more chunk whose
        sequences (one per KV head) read the cache's first keys (finite values, never used). Vectorised
        (numpy): it runs on the inference thread before each step's launch -- its first step's with the GPU
        idle (torch ops on small tensors here took ~2 ms for 16 chunks: the largest GPU idle, ~5 %, in a
        profiled run on an H200 under 64 clients)."""
        import numpy as np

        S, nkv, L, P = self.slots, self.n_kv, self.max_cache_len, self.prefill_chunk
        cs = plan.chunks
        m = len(cs)
        n = np.array([c.tokens for c in cs] + [0], dtype=np.int64)
        real = int(n.sum())
        n[m] = T - real  # the padding chunk
        slots = np.array([c.slot for c in cs] + [S], dtype=np.int64)
        starts = np.array([c.start for c in cs] + [0], dtype=np.int64)
        srcs = np.array([c.src for c in cs] + [self._ring_zero], dtype=np.int64)
        ends = np.array([c.end for c in cs] + [0], dtype=np.int64)
        off = np.concatenate([[0], np.cumsum(n)[:-1]])
        cid = np.repeat(np.arange(m + 1), n)  # each row's chunk
        r = np.arange(T) - off[cid]  # its place in the chunk
        pad = cid == m
        src = np.where(pad, self._ring_zero, srcs[cid] + r)
        pos = np.where(pad, 0, starts[cid] + r)
        rope = np.zeros((3, T), dtype=np.int64)
        if cs:
            rope[:, :real] = np.concatenate([c.item.prepared.positions[:, c.start : c.end].numpy() for c in cs], 1)
        # Sequence-major order: chunk j's rows for KV head 0, then head 1, ...: e -> (head e // n_j, row e % n_j)
        cid2 = np.repeat(np.arange(m + 1), n * nkv)
        e = np.arange(T * nkv) - off[cid2] * nkv
        perm = (off[cid2] + e % n[cid2]) * nkv + e // n[cid2]
        inv = np.empty_like(perm)
        inv[perm] = np.arange(perm.size)
        jj, hh = np.repeat(np.arange(m + 1), nkv), np.tile(np.arange(nkv), m + 1)  # the sequences (chunk, head)
        empty = (P - m) * nkv  # no more lines: empty sequences
        cu_q = np.concatenate([off[jj] * nkv + hh * n[jj], np.full(empty + 1, T * nkv)])
        cu_k = np.concatenate([np.where(jj == m, hh * L, (slots[jj] * nkv + hh) * L), np.zeros(empty, np.int64),
                               [S * nkv * L]])
        used = np.concatenate([np.where(jj == m, max(int(n[m]), 1), ends[jj]), np.ones(empty, np.int64)])
        fin = [j for j, c in enumerate(cs) if c.last]
        last, done, end = np.zeros(P, np.int64), np.full(P, S, np.int64), np.ones(P, np.int64)
        last[: len(fin)] = off[fin] + n[fin] - 1
        done[: len(fin)] = slots[fin]
        end[: len(fin)] = ends[fin]
        return self.torch.from_numpy(np.concatenate([src, slots[cid], pos, rope.reshape(-1), perm, inv, cu_q, cu_k,
                                                     used, last, done, end]).astype(np.int64))

    def _launch_mixed(self, B: int, plan: StepPlan) -> None:
        """Queue one mixed step of *plan*'s chunks after *B* decode rows: its inputs copied (pinned, without
        waiting), then its graph replayed -- or run eagerly where none was captured (CPU, graphs off)."""
        T = self._budget_for(plan.tokens)
        self._mixed_buffer(T).copy_(to_device(self._mixed_host(plan, T), self.device))
        g = self._mixed_graphs.get((B, T)) if self.cuda_graphs else None
        if g is not None:
            g.graph.replay()
        else:
            if self.cuda_graphs and (B, T) not in self._missing_graphs:
                self._missing_graphs.add((B, T))
                logger.warning("no mixed-step graph for batch %d x %d prompt tokens (not warmed up): uncaptured", B, T)
            self._mixed_step(B, T)
        self.mixed_steps += 1

    def _mixed_step(self, B: int, T: int) -> None:
        """One step over slots [:B]'s decode rows and *T* prompt rows (the chunks :meth:`_mixed_host` wrote
        into the static inputs): every row through the layers together (the decode rows ride along the
        prompt's GEMMs), keys and values of both into the cache by one index_copy per layer, attention over
        the cache (:func:`htrd.attention.cache_attention`: one call for the decode rows, one for the prompt chunks); the
        decode rows' next tokens as :meth:`_decode_step`'s, and
        each line whose prompt ended here gets its first token and starts decoding at the next step. Only
        touches fixed buffers: captured per (B, T)."""
        torch = self.torch
        F = torch.nn.functional
        S, nkv, nh, hd, L = self.slots, self.n_kv, self.n_heads, self.head_dim, self.max_cache_len
        src, slot, pos_t, rope_t, perm, inv, cu_q_t, cu_k_t, used_t, last, done, end = self._mixed_inputs(T)
        rows, pos = self.rows[:B], self.pos[:B]
        dec_rows = kv_rows(rows, self.kv_heads, pos, L)
        # The decode step's kernel (Triton's where it runs; with SDPA it also keeps the mask current)
        decode_attention = self._decode_attention_fn(B, L, dec_rows)
        # Finished and free slots (a joining line's among them) write their decode row's keys to the scratch
        # row: their position 0 is where a chunk of a joining prompt may write in this very step.
        dec_rows = torch.where(self.finished[:B, None], self._scratch_row, dec_rows)
        pf_rows = torch.where(slot[:, None] < S, kv_rows(slot, self.kv_heads, pos_t, L), self._scratch_row)
        kv_flat = torch.cat([dec_rows.reshape(-1), pf_rows.reshape(-1)])
        cu_q, cu_k, used = cu_q_t.int(), cu_k_t.int(), used_t.int()
        h = torch.cat([self.text.embed_tokens(self.tok[:B, 0]), self._stage_h.index_select(0, src)])
        N = B + T
        rope = torch.cat([(pos + self.delta[:B]).view(1, B).expand(3, B), rope_t.view(3, T)], dim=1)
        cos, sin = self.text.rotary_emb(h[None], rope[:, None])
        cos, sin = cos.reshape(N, 1, hd), sin.reshape(N, 1, hd)
        D = B * nkv

        def attend(li, att, q, k, v):
            self._k_rows[li].index_copy_(0, kv_flat, k.reshape(N * nkv, hd))
            self._v_rows[li].index_copy_(0, kv_flat, v.reshape(N * nkv, hd))
            q = q.reshape(N * nkv, nh // nkv, hd)
            kc, vc = self.k_cache[li], self.v_cache[li]
            # Two calls: the decode rows with one query each, through the decode step's kernel (Triton's reads a
            # KV head's keys once for its g query heads: ~1.7x flash's time saved at 64-128 rows on an H200),
            # the prompt chunks with theirs.
            od = decode_attention(q[:D].view(B, nkv, nh // nkv, hd), kc, vc, scale=att.scaling)
            op = cache_attention(q[D:].index_select(0, perm), kc, vc, scale=att.scaling, cu_q=cu_q, cu_k=cu_k,
                                  used=used, max_q=T, span=L)
            return torch.cat([od.reshape(D, nh // nkv, hd), op.index_select(0, inv)]).reshape(N, nh * hd)

        vis = torch.arange(B, N, device=self.device)
        deepstack = [d.index_select(0, src) for d in self._stage_ds]
        x = self._layers(h, cos, sin, attend, vis, deepstack)
        logits = F.linear(torch.cat([x[:B], x[B:].index_select(0, last)]), self.lm_head.weight).float()
        self._select(logits[:B], B)
        first = logits[B:]
        first = torch.argmax(torch.where((self.lim_min[done] > 0)[:, None], first + self.eos_bias, first), dim=-1)
        self.out[done, 0] = first
        self.tok[done, 0] = first
        self.nstep.index_fill_(0, done, 1)  # (a Python scalar would be a host copy: not allowed in a capture)
        self.pos[done] = end
        self.finished[done] = (first[:, None] == self.eos[None, :]).any(dim=1) | (self.lim_max[done] <= 1)
        self.attend[done] = self.rows_l[None] < end[:, None]

    def _reset_slots(self, slots: list[int]) -> None:
        """Mark *slots* free on the device (inert rows: finished, position 0, one visible position)."""
        if not slots:
            return
        t = self._on_device(slots)
        self.finished.index_fill_(0, t, True)
        self.pos.index_fill_(0, t, 0)
        self.kv_first.index_fill_(0, t, 0)
        self.nstep.index_fill_(0, t, 0)
        self.attend.index_fill_(0, t, False)
        self.attend[:, :1].index_fill_(0, t, True)

    def _on_device(self, values: Sequence[int]):
        """A long tensor of host *values* on the device, without waiting for the GPU (:func:`to_device`): a
        blocking copy (what ``torch.tensor(..., device=cuda)`` does) waits for every kernel queued before it
        -- in a prefill launched behind decode steps (:meth:`step`'s *during*), for those steps."""
        return to_device(self.torch.tensor(values, dtype=self.torch.long), self.device)

    # ---------------------------------------------------------------- scheduling
    def free_slots(self) -> int:
        return len(self._free)

    def running(self) -> list[Seq]:
        return [s for s in self._seqs if s is not None]

    def occupancy(self) -> int:
        return self.slots - len(self._free)

    def bucket_for(self, n: int) -> int:
        for b in self.batch_sizes:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the largest batch size {self.max_batch}")

    def add(self, seqs: Sequence[Seq]) -> list[Finished]:
        """Prefill *seqs* into free slots; they decode from the next :meth:`step`.

        Lines whose prompt plus ``max_new_tokens`` exceeds the cache are served
        whole by the uncaptured HF path here and returned finished.
        """
        if len(seqs) > len(self._free):
            raise ValueError(f"{len(seqs)} lines for {len(self._free)} free slots")
        done: list[Finished] = []
        fit = []
        for s in seqs:
            need = s.prepared.prompt_len + min(int(s.max_new_tokens), self.max_new_tokens)
            if need > self.max_cache_len:
                logger.warning("prompt %d + %d new tokens exceeds the cache (%d): uncaptured path",
                               s.prepared.prompt_len, s.max_new_tokens, self.max_cache_len)
                done.append(self._generate_eager(s))
            else:
                fit.append(s)
        if self.mixed:  # prefilled by the next steps, in order (_join)
            self._join(fit)
            return done + self._take_failed()
        # Shortest prompts first: when more lines join than one prefill takes, each group pads to a
        # similar length (a page's 300-px and 2,000-px lines prefill apart, not padded to the widest).
        # They all join before the next decode step, so their order among themselves costs nothing.
        fit.sort(key=lambda s: s.prepared.prompt_len)
        with self.torch.inference_mode():
            for chunk in self._chunks(fit):
                self._prefill(chunk)
        return done

    def _join(self, seqs: Sequence[Seq]) -> None:
        """Mixed steps: *seqs* take free slots and queue for prefilling (:class:`htrd.chunks.PrefillQueue`);
        their limits and rope offsets reach the device now (one copy), their embeddings the staging ring as
        far as it has room (:meth:`_stage`). The slots stay finished (no decode row) until the step that
        prefills a line's last prompt token chooses its first token."""
        if not seqs:
            return
        n, t0 = len(seqs), time.perf_counter()
        slots = [heapq.heappop(self._free) for _ in range(n)]
        max_new = [min(int(s.max_new_tokens), self.max_new_tokens) for s in seqs]
        min_new = [max(0, min(int(s.min_new_tokens), m)) for s, m in zip(seqs, max_new)]
        for s, slot, m in zip(seqs, slots, max_new):
            self._seqs[slot] = s
            self._need[slot] = s.prepared.prompt_len + m
            self._left[slot] = m - 1  # the prefill chooses the first token
            self._group[slot] = n
            self._prefill_end[slot] = t0  # until the line's last chunk is launched
            self._prefills.push(slot, s.prepared.prompt_len, s)
        with self.torch.inference_mode():
            try:
                st, delta, lim_max, lim_min = self._on_device(
                    [*slots, *(s.prepared.rope_span - s.prepared.prompt_len for s in seqs), *max_new,
                     *min_new]).view(4, n)
                self.delta[st] = delta
                self.lim_max[st] = lim_max
                self.lim_min[st] = lim_min
            except BaseException:  # nothing joined: the caller answers these lines
                for slot in slots:
                    self._prefills.drop(slot)
                    self._seqs[slot] = None
                    heapq.heappush(self._free, slot)
                raise
            self._stage()  # a line whose staging fails is answered with its error (_fail), not raised

    def _chunks(self, seqs: Sequence[Seq]) -> list[list[Seq]]:
        """Consecutive prefill groups of at most ``prefill_chunk`` lines. A group's prompts are left-padded
        to its longest, so every member's padded prompt plus its new tokens must fit the cache."""
        out: list[list[Seq]] = []
        cur: list[Seq] = []
        width = longest = 0
        for s in seqs:
            m = min(int(s.max_new_tokens), self.max_new_tokens)
            w, lg = max(width, s.prepared.prompt_len), max(longest, m)
            if cur and (len(cur) >= self.prefill_chunk or w + lg > self.max_cache_len):
                out.append(cur)
                cur, w, lg = [], s.prepared.prompt_len, m
            cur.append(s)
            width, longest = w, lg
        if cur:
            out.append(cur)
        return out

    def _prefill(self, seqs: Sequence[Seq]) -> None:
        torch = self.torch
        self._turnaround_end()
        t0 = time.perf_counter()
        n = len(seqs)
        items = [s.prepared for s in seqs]
        packed = self.packed
        # Each line's cache positions [first, end): from 0 packed, else its prompt left-padded to the group's width.
        if packed:  # its token tensors are built by _packed_last
            batch = image_batch(items, device=self.device, dtype=self.pre.dtype)
            ends, firsts = [it.prompt_len for it in items], [0] * n
        else:
            width = self._graph_width(seqs)
            batch = self._collate(items, width)
            P = int(batch["input_ids"].shape[1])
            ends, firsts = [P] * n, [P - it.prompt_len for it in items]
        max_new = [min(int(s.max_new_tokens), self.max_new_tokens) for s in seqs]
        min_new = [max(0, min(int(s.min_new_tokens), m)) for s, m in zip(seqs, max_new)]
        slots = [heapq.heappop(self._free) for _ in range(n)]
        # The slots and the lines' host values in one copy: slots, rope deltas, max_new, min_new, first and end
        # positions.
        st, delta, lim_max, lim_min, first_pos, end_pos = self._on_device(
            [*slots, *(it.rope_span - e for it, e in zip(items, ends)), *max_new, *min_new, *firsts, *ends]).view(6, n)
        try:
            with _no_cudnn_attention(torch):
                if packed:
                    last = self._packed_last(batch, items, slots)
                else:
                    last = self._prompt_last(batch, prompt_layout(items, device=self.device, width=width), st)
        except BaseException:
            for s in slots:
                heapq.heappush(self._free, s)
            raise
        # Nothing below waits for the GPU: host values reach it through pinned non-blocking copies, scalars
        # through index_fill_ (see _on_device).
        seen = self.rows_l[None]
        self.attend[st] = (seen >= first_pos[:, None]) & (seen < end_pos[:, None])
        self.delta[st] = delta
        self.pos[st] = end_pos
        self.kv_first[st] = first_pos
        self.lim_max[st] = lim_max
        self.lim_min[st] = lim_min
        logits = torch.nn.functional.linear(last, self.lm_head.weight).float()
        logits = torch.where((lim_min > 0)[:, None], logits + self.eos_bias, logits)
        first = torch.argmax(logits, dim=-1)
        self.out[st, 0] = first
        self.tok[st, 0] = first
        self.nstep.index_fill_(0, st, 1)
        self.finished[st] = (first[:, None] == self.eos[None, :]).any(dim=1) | (lim_max <= 1)
        t1 = time.perf_counter()
        for s, slot, m, e in zip(seqs, slots, max_new, ends):
            self._seqs[slot] = s
            self._need[slot] = e + m
            self._left[slot] = m - 1  # the prefill chose the first token
            self._group[slot] = n
            self._prefill_ms[slot] = (t1 - t0) * 1000.0
            self._prefill_end[slot] = t1

    def step(self, stop: Callable[[Seq], bool] | None = None, steps: int = STEPS_PER_CALL,
             during: Callable[[], None] | None = None) -> list[Finished]:
        """Up to *steps* decode steps for every running line; returns (and frees) the lines that finished.

        *stop(seq)* True takes a running line out now, with the tokens it has. With a few lines running,
        never more steps than the nearest line's ``max_new_tokens`` needs: a line is answered right after
        its last token. With more, a line that reaches its limit mid-call waits (frozen) for the call's
        end: when lines of many lengths run, nearly every call would otherwise be one step and one wait
        for the GPU (see STOP_AT_LAST_TOKEN_LINES).

        *during()* runs once the steps are launched and before the host waits for them: the engine
        prefills newcomers there (:meth:`add`), so the host's work of launching a prefill overlaps the
        GPU's decoding instead of following it. Lines added in *during* decode from the next call.

        With mixed steps, each step also prefills up to ``prefill_tokens`` prompt tokens of the lines waiting
        (:class:`htrd.chunks.PrefillQueue`), planned when the call starts; a line decodes from the step after
        the one that took its prompt's last token. Lines whose staging failed are returned too (``error``).
        """
        torch = self.torch
        if self.mixed and not self._prefills.pending_tokens():  # nothing staged to plan: stage now, else behind
            with torch.inference_mode():  # the steps
                self._stage()
        occupied = [i for i, s in enumerate(self._seqs) if s is not None]
        if not occupied:
            if during is not None:
                during()
            return self._take_failed()
        plans: list[StepPlan] = []
        joining: dict[int, int] = {}  # slot -> the step of this call that chooses its first token (1-based)
        if self.mixed:
            plans = self._prefills.plan(steps)
            for k, plan in enumerate(plans, 1):
                for c in plan.finishing():
                    joining[c.slot] = k
        waiting = set(self._prefills.slots()) if self.mixed else set()  # joined, not yet decoding
        decoding = [i for i in occupied if i not in waiting]
        # The step of this call at which each line reaches its last token (lines prefilled later: none).
        reach = [self._left[i] for i in decoding] + [k + self._left[i] for i, k in joining.items()]
        if len(occupied) <= STOP_AT_LAST_TOKEN_LINES and reach:
            steps = max(1, min(steps, min(reach)))
        if not decoding and not joining:  # only prompts being prefilled: no steps past the work planned
            steps = max(1, sum(1 for plan in plans if plan.chunks))
        plans = plans[:steps]
        if self.mixed:
            self._prefills.commit(plans)
        self.step_calls += 1
        for i in decoding:
            self._left[i] -= steps
        for i, k in joining.items():
            if k <= steps:
                self._left[i] -= steps - k
        B = self.bucket_for(occupied[-1] + 1)
        L = self._span_for(max(self._need[i] for i in occupied))
        graph = self._graphs.get((B, L)) if self.cuda_graphs else None
        if self.cuda_graphs and graph is None and (B, L) not in self._missing_graphs:
            self._missing_graphs.add((B, L))
            logger.warning("no decode graph for batch %d x span %d (not warmed up): uncaptured steps", B, L)
        self._turnaround_end()
        running = len(decoding)
        with torch.inference_mode():
            for k in range(steps):
                plan = plans[k] if k < len(plans) else None
                if plan is not None and plan.chunks:
                    self._launch_mixed(B, plan)
                    t = time.perf_counter()
                    for c in plan.finishing():
                        self._prefill_ms[c.slot] = (t - self._prefill_end[c.slot]) * 1000.0
                        self._prefill_end[c.slot] = t
                elif graph is not None:
                    graph.graph.replay()
                else:
                    self._step_fn(B, L)
                self.occupied_sum += running
                if plan is not None:
                    running += len(plan.finishing())
            self.steps_run += steps
            fin_t, counts_t, out_t = self._results(B)
            if self.mixed:  # lines that waited for staging rows: their host work overlaps the launched steps
                self._stage()
        if during is not None:
            during()
        self._results_ready()
        fin, counts = fin_t.tolist(), counts_t.tolist()
        t_end = time.perf_counter()
        still = set(self._prefills.slots()) if self.mixed else set()  # still prefilling: their flags mean nothing
        leaving = [i for i in occupied if self._seqs[i] is not None and (
            (fin[i] and i not in still) or (stop is not None and stop(self._seqs[i])))]
        if not leaving:
            self._idle_since = t_end
            return self._take_failed()
        done = self._take_failed()
        for i in leaving:
            seq = self._seqs[i]
            ids = []
            if i not in still:
                for t in out_t[i, : counts[i]].tolist():
                    ids.append(int(t))
                    if t in self.eos_ids:
                        break
            else:
                self._prefills.drop(i)
            done.append(Finished(seq, ids, stopped=not fin[i] or i in still, group=self._group[i],
                                 prefill_ms=self._prefill_ms[i], decode_ms=(t_end - self._prefill_end[i]) * 1000.0))
            self._seqs[i] = None
            heapq.heappush(self._free, i)
        with torch.inference_mode():
            self._reset_slots(leaving)
        if len(leaving) < len(occupied):
            self._idle_since = time.perf_counter()
        return done

    def _results(self, B: int):
        """What the host reads after the launched steps, for slots [:B]: finished flags, token counts and the
        tokens. On CUDA copied into pinned host memory without waiting (work launched later -- a prefill --
        does not delay them); :meth:`_results_ready` waits for the copies."""
        if self.device.type != "cuda":
            return self.finished[:B], self.nstep[:B], self.out[:B]
        torch = self.torch
        if self._host is None:
            S = self.slots
            self._host = (torch.empty((S,), dtype=torch.bool, pin_memory=True),
                          torch.empty((S,), dtype=torch.long, pin_memory=True),
                          torch.empty(tuple(self.out.shape), dtype=torch.long, pin_memory=True),
                          torch.cuda.Event())
        fin, counts, out, event = self._host
        fin[:B].copy_(self.finished[:B], non_blocking=True)
        counts[:B].copy_(self.nstep[:B], non_blocking=True)
        out[:B].copy_(self.out[:B], non_blocking=True)
        event.record()
        return fin[:B], counts[:B], out[:B]

    def _results_ready(self) -> None:
        if self._host is not None:  # CUDA: wait for _results' copies
            self._host[3].synchronize()

    def _turnaround_end(self) -> None:
        """GPU work is about to be launched: count the host's time since the last check that waited for the
        GPU (with lines running, the GPU had nothing to do meanwhile)."""
        if self._idle_since is not None:
            self.turnaround_s += time.perf_counter() - self._idle_since
            self.turnarounds += 1
            self._idle_since = None

    def _generate_eager(self, seq: Seq) -> Finished:
        """The uncaptured path for a line longer than the cache: HF ``generate`` on the merged model."""
        t0 = time.perf_counter()
        batch = self._collate([seq.prepared])
        P = batch["input_ids"].shape[1]
        max_new = min(int(seq.max_new_tokens), self.max_new_tokens)
        with self.torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new,
                                      min_new_tokens=max(0, min(int(seq.min_new_tokens), max_new)),
                                      do_sample=False, pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        ids = []
        for t in out[0, P:].tolist():
            ids.append(int(t))
            if t in self.eos_ids:
                break
        return Finished(seq, ids, group=1, decode_ms=(time.perf_counter() - t0) * 1000.0)

    # -------------------------------------------------------------- decode step
    def _fuse_weights(self) -> None:
        """Concatenate q/k/v and gate/up weights per layer; the HF modules keep views into them.

        One GEMM instead of three (two) per decode step; no extra memory: the
        original tensors are replaced by views of the fused one, so the prefill
        (HF forward) reads the same bytes.
        """
        torch = self.torch
        nn = torch.nn
        self._qkv_w, self._gu_w = [], []
        with torch.no_grad():
            for layer in self.layers:
                att, mlp = layer.self_attn, layer.mlp
                if any(m.bias is not None for m in (att.q_proj, att.k_proj, att.v_proj)):
                    raise ValueError("fastgen expects bias-free attention projections (Qwen3-VL)")
                self._qkv_w.append(_fuse_rows([att.q_proj, att.k_proj, att.v_proj], torch, nn))
                self._gu_w.append(_fuse_rows([mlp.gate_proj, mlp.up_proj], torch, nn))

    def _small_prefill_graphs(self, n: int) -> bool:
        """Whether a prefill of *n* lines may run as a CUDA graph (see PREFILL_GRAPH_LINES)."""
        return self._prefill_graphs_ok and self.vision.own and n <= PREFILL_GRAPH_LINES

    def _graph_width(self, seqs: Sequence[Seq]) -> int | None:
        """The padded prompt width of a small prefill that may run as a CUDA graph: its longest prompt rounded
        up to PREFILL_BUCKET positions (so prompts of many lengths share a few graphs), if the padded prompt
        plus the group's new tokens still fits the cache. None: the group's own longest prompt."""
        if not self._small_prefill_graphs(len(seqs)):
            return None
        width = _round_up(max(s.prepared.prompt_len for s in seqs), PREFILL_BUCKET)
        longest = max(min(int(s.max_new_tokens), self.max_new_tokens) for s in seqs)
        return width if width + longest <= self.max_cache_len else None

    def _prompt_last(self, batch, layout, st):
        """The prompts through the model (:meth:`_prompt_inputs`, :meth:`_prefill_layers`); returns each line's
        last hidden state, (n, H). A small prefill (see PREFILL_GRAPH_LINES) is replayed from a CUDA graph:
        the whole prefill when its exact shape (prompt width, image grids) recurs, else its two parts: the
        vision tower per (images, padded patch rows), the language model per (lines, padded width), each
        captured on its key's first prefill."""
        ids, pixels, mask, grid_thw = batch["input_ids"], batch["pixel_values"], batch["attention_mask"], \
            batch["image_grid_thw"]
        args = [ids, pixels, mask, layout.position_ids, layout.image_index, st]
        n, P = int(st.shape[0]), int(ids.shape[1])
        if not self._small_prefill_graphs(n):
            return self._prompt_forward(*args, grid_thw, layout)
        key = (P, tuple(layout.grids))
        g = self._prefill_graphs.get(key)
        if g is not None:
            return self._replay(g, args)
        if len(self._prefill_graphs) < PREFILL_GRAPHS and _seen(self._prefill_seen, key) >= PREFILL_GRAPH_AFTER:
            # a recurring shape, room for its graph: capture it whole
            last = self._prompt_forward(*args, grid_thw, layout)
            inputs = [a.clone() for a in args]
            keep = [self.vision.grid_inputs([gr]) for gr in layout.grids]  # the cached tensors the graph reads
            g = self._record(lambda: self._prompt_forward(*inputs, grid_thw, layout), inputs, last, keep)
            if g is not None:
                self._prefill_graphs[key] = g
            return last
        embeds, deepstack = self._prompt_inputs(ids, pixels, layout.image_index, grid_thw, layout,
                                                replay_vision=True)
        lm = self._lm_graphs.get((n, P))
        full = len(self._lm_graphs) >= self.lm_graph_limit
        if lm is None and (full or _seen(self._lm_seen, (n, P)) < LM_GRAPH_AFTER):
            return self._prefill_layers(embeds, mask, layout.position_ids, layout.image_index, deepstack, st)[:, -1]
        # The language model's graph reads fixed-size inputs: the image positions and deepstack features padded.
        lm_args = [embeds, mask, layout.position_ids, *self._dense_deepstack(layout.image_index, deepstack, n * P), st]
        if lm is not None:
            return self._replay(lm, lm_args)
        inputs = self._static_inputs(self._lm_buffers, lm_args, n * P, PREFILL_GRAPH_LINES * self.max_cache_len)

        def lm_part():
            return self._prefill_layers(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4:-1], inputs[-1])[:, -1]

        last = lm_part()  # eagerly first: the capture then finds every kernel it records
        g = self._record(lm_part, inputs, last, [])
        if g is not None:
            self._lm_graphs[(n, P)] = g
        return last

    def _packed_last(self, batch, items: Sequence[Prepared], slots: list[int]):
        """The prompts of a prefill packed back to back (no padding) through the model, keys and values into
        *slots* at positions [0, prompt length); returns each line's last hidden state, (n, H). Its tokens
        are padded to :func:`_pack_width` and the language model's part replays a CUDA graph per padded width
        (captured on the width's first prefill): a prefill of any number of lines is a few launches, where
        the eager one is bound by launching ~1,000 kernels (on an H200 under load, a 7-line prefill kept the
        GPU busy under half its time). The vision tower replays its graph per padded patch rows
        (:meth:`_vision_replayed`) where graphs are on."""
        torch = self.torch
        n = len(items)
        N = max(self.prefill_chunk, n)  # lines a packed graph takes (_chunks: never more than prefill_chunk)
        lens = [it.prompt_len for it in items]
        T = _pack_width(sum(lens))
        # Host-built, one copy: token ids, rope positions (3 rows), each token's slot (padding: the scratch
        # slot) and cache position, the sequences' bounds (the padding is one more sequence, then empty ones up
        # to N lines), each line's last token, the image tokens' places.
        ids = torch.full((T,), self.pad_id, dtype=torch.long)
        pos3 = torch.zeros((3, T), dtype=torch.long)
        tok_slot = torch.full((T,), self.slots, dtype=torch.long)
        tok_pos = torch.zeros((T,), dtype=torch.long)
        cu = torch.full((N + 2,), T, dtype=torch.long)
        last = torch.zeros((N,), dtype=torch.long)
        index, off = [], 0
        cu[0] = 0
        for i, (it, slot, m) in enumerate(zip(items, slots, lens)):
            ids[off : off + m] = it.input_ids
            pos3[:, off : off + m] = it.positions
            tok_slot[off : off + m] = slot
            tok_pos[off : off + m] = torch.arange(m)
            index.append(it.image_positions + off)
            off += m
            cu[i + 1] = off
            last[i] = off - 1
        index = torch.cat(index)
        parts = to_device(torch.cat([ids, pos3.view(-1), tok_slot, tok_pos, cu, last, index]), self.device).split(
            [T, 3 * T, T, T, N + 2, N, int(index.shape[0])])
        ids_d, pos_d, slot_d, tpos_d, cu_d, last_d, index_d = parts
        lengths, grids = image_grids(items)
        layout = PromptLayout(position_ids=None, image_index=index_d, vision_lengths=lengths, grids=grids)
        embeds, deepstack = self._prompt_inputs(ids_d, batch["pixel_values"], index_d, batch["image_grid_thw"],
                                                layout, replay_vision=self._prefill_graphs_ok and self.vision.own)
        args = [embeds, pos_d.view(3, T), slot_d, tpos_d, cu_d.int(), last_d,
                *self._dense_deepstack(index_d, deepstack, T)]
        g = self._packed_graphs.get(T)
        if g is not None:
            return self._replay(g, args)[:n]
        if not self._prefill_graphs_ok:
            return self._packed_layers(*args)[:n]
        inputs = self._static_inputs(self._packed_buffers, args, T, max(T, PACKED_BUFFER_TOKENS))

        def lm_part():
            return self._packed_layers(*inputs)

        if self._packed_graphs:  # a new width of a captured kind: capture, then replay (no eager run first)
            g = self._capture_packed(T, inputs)
            if g is not None:
                g.graph.replay()
                return g.out[:n]
        out = lm_part()  # eagerly first: the capture then finds every kernel it records
        g = self._record(lm_part, inputs, out, [])
        if g is not None:
            self._packed_graphs[T] = g
        return out[:n]

    def _packed_layers(self, h, pos3, tok_slot, tok_pos, cu, last, vis, *deepstack):
        """The language model over packed prompts *h* (T, H): rope positions *pos3* (3, T); each token's keys
        and values land in its slot *tok_slot* at cache position *tok_pos* (padding tokens: slot ``slots``, the
        cache's scratch row); causal flash attention within each sequence of the bounds *cu* (int32); the
        deepstack features join at *vis*. Returns the final norm at the positions *last*, (len(last), H). Shapes
        depend on T only (and the prefill chunk): captured per T."""
        torch = self.torch
        T = h.shape[0]
        nh, nkv, hd, L = self.n_heads, self.n_kv, self.head_dim, self.max_cache_len
        cos, sin = self.text.rotary_emb(h[None], pos3[:, None])  # (1, T, hd)
        cos, sin = cos.reshape(T, 1, hd), sin.reshape(T, 1, hd)
        rows = kv_rows(tok_slot, self.kv_heads, tok_pos, L)  # past the slots for padding tokens: the scratch row
        rows = torch.where(tok_slot[:, None] < self.slots, rows, self._scratch_row).reshape(-1)
        # Every real sequence fits the cache; the padding sequence is shorter than one step of _pack_width.
        span = min(T, max(L, T // 8 + PACK_MIN))

        def attend(li, att, q, k, v):
            k, v = k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
            self._k_rows[li].index_copy_(0, rows, k.reshape(T * nkv, hd))
            self._v_rows[li].index_copy_(0, rows, v.reshape(T * nkv, hd))
            return packed_attention(q.reshape(T, nh, hd), k, v, cu, span=span, scale=att.scaling).reshape(T, nh * hd)

        x = self._layers(h, cos, sin, attend, vis, deepstack)
        return x.index_select(0, last)

    def _replay(self, g: _PrefillGraph, args) -> object:
        for buf, a in zip(g.inputs, args):
            buf.copy_(a)
        g.graph.replay()
        self.prefill_replays += 1
        return g.out

    def _dense_deepstack(self, index, deepstack, rows: int) -> list:
        """The image-token positions and the deepstack features padded to *rows* entries (position 0, zero
        features: adding them changes nothing), so their shapes depend on the prompt's width only."""
        torch = self.torch
        k = int(index.shape[0])
        vis = torch.zeros((rows,), dtype=index.dtype, device=index.device)
        vis[:k] = index
        out = [vis]
        for d in deepstack:
            full = torch.zeros((rows, d.shape[-1]), dtype=self.dtype, device=d.device)
            full[:k] = d
            out.append(full)
        return out

    def _static_inputs(self, buffers: list, args: list, rows: int, max_rows: int) -> list:
        """Static inputs of a graph about to be captured, holding *args*' values: views of one allocation per
        argument in *buffers* (one list per kind of graph), sized at first for *max_rows* where *args* have
        *rows* (lines x padded width, or padded patch rows) and grown as needed -- graphs of a kind replay one
        at a time and every replay writes its inputs first; an outgrown allocation lives on in the graphs that
        captured views of it."""
        views = []
        for i, a in enumerate(args):
            need = a.numel()
            buf = buffers[i] if i < len(buffers) else None
            if buf is None or buf.numel() < need or buf.dtype != a.dtype:
                size = max(need, need // rows * max_rows)
                buf = self.torch.empty((size,), dtype=a.dtype, device=a.device)
                if i < len(buffers):
                    buffers[i] = buf
                else:
                    buffers.append(buf)
            views.append(buf[:need].view(a.shape).copy_(a))
        return views

    def _record(self, fn: Callable[[], object], inputs: list, last, keep: list, *,
                direct: bool = False, out=None) -> _PrefillGraph | None:
        """Capture *fn* reading *inputs*; its result lands in *out* (a buffer shaped like *last* when not
        given). Usually *fn* (a prefill) has just run eagerly on the same shapes, so every kernel, compiled op
        and cuDNN plan it needs exists: capturing launches nothing. None, and prefill graphs off, if capturing
        fails.

        *direct*: no eager run came first -- a new shape of a kind already captured (its kernels are loaded,
        its compiled ops are dynamic in the row count): the caller replays the graph for this prefill's result,
        which saves the eager run's host time (~30-80 ms of launching on an H200, the GPU idle meanwhile). A
        direct capture that fails leaves prefill graphs on: the caller runs eagerly and captures as usual."""
        torch = self.torch
        t0 = time.perf_counter()
        if out is None:
            out = torch.empty(last.shape, dtype=last.dtype, device=self.device)  # *last* may be on the meta device
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    out.copy_(fn())
                finally:
                    graph.capture_end()
        except Exception as exc:  # noqa: BLE001 -- never fatal: this prefill already ran; later ones stay eager
            torch.cuda.current_stream(self.device).wait_stream(side)
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if direct:
                self.direct_capture_failures += 1
                logger.info("capturing a prefill graph without an eager run first failed (%s); running it eagerly",
                            why)
                return None
            self._prefill_graphs_ok = False
            logger.warning("capturing a prefill graph failed (%s); prefills stay uncaptured", why)
            return None
        torch.cuda.current_stream(self.device).wait_stream(side)
        logger.debug("captured a prefill graph%s: %s in %.0f ms", " directly" if direct else "",
                     [tuple(a.shape) for a in inputs[:1]], (time.perf_counter() - t0) * 1000.0)
        return _PrefillGraph(graph, inputs, out, keep)

    def _prompt_inputs(self, input_ids, pixel_values, image_index, grid_thw, layout, replay_vision: bool = False):
        """The prompt's input embeddings with the image tokens in place (at the flat positions *image_index*),
        (n, P, H) -- or (T, H) for packed ids (T,) -- and the vision tower's deepstack features (image tokens x
        H per layer). *replay_vision*: the vision tower from a graph over padded patches
        (:meth:`_vision_replayed`)."""
        embeds = self.text.embed_tokens(input_ids)  # (n, P, H)
        # (frames: one per line image; more frames than a prefill's lines only in other inputs)
        if replay_vision and self.vision.varlen and len(layout.vision_lengths) <= self.prefill_chunk:
            image, deepstack = self._vision_replayed(pixel_values, layout)
        else:
            image, deepstack = self.vision(pixel_values, grid_thw, layout.grids, layout.vision_lengths)
        embeds.view(-1, embeds.shape[-1]).index_copy_(0, image_index, image.to(embeds.dtype))
        return embeds, deepstack

    def precapture_next(self) -> bool:
        """Capture one packed-prefill graph no prefill has needed yet -- a language-model width or a vision
        row count, up to prefills of ``prefill_chunk`` lines of PRECAPTURE_LINE_TOKENS tokens (1,024 patches)
        each -- so that a later prefill of that size replays at once instead of capturing on first sight. For
        the engine's idle moments, on the inference thread; each call is one capture (~75 ms on an H200).
        Captured directly (:meth:`_record`), on stand-in inputs of the right shapes: a capture runs nothing,
        and every replay writes its own inputs first.

        Largest first: the graphs share one memory pool, and a capture reuses the blocks earlier captures
        freed only where they are large enough -- smallest first, each larger capture took new memory (on an
        H200, ~23 GB more reserved after ~100 graphs, with their separate vision outputs). It stops while the
        GPU has less than PRECAPTURE_MIN_FREE of its memory free (serving's prefills need it more). Returns
        False once nothing is left to capture (or prefills are not packed and captured here: no kind captured
        yet, graphs off, a CPU)."""
        if not (self.packed and self._prefill_graphs_ok and (self._packed_graphs or self._vision_graphs)):
            return False
        if self.device.type == "cuda":
            free, total = self.torch.cuda.mem_get_info(self.device)
            if free < PRECAPTURE_MIN_FREE * total:
                logger.info("not capturing prefill graphs ahead of need: %.1f of %.1f GiB of GPU memory free",
                            free / 2**30, total / 2**30)
                self._precapture_plan = []
                return False
        if self._precapture_plan is None:
            lines = self.prefill_chunk
            widths = sorted({_pack_width(t) for t in range(PACK_MIN, lines * PRECAPTURE_LINE_TOKENS + 1, 8)})
            rows = range(ROW_BUCKET, self.vision.rows_for(lines * 4 * ROW_BUCKET) + 1, ROW_BUCKET)
            vision = self.vision.varlen and self.vision.own and bool(self._vision_graphs)
            lm = bool(self._packed_graphs) and not self.mixed  # mixed steps: no prefill of the language model
            plan = ([("lm", w) for w in widths] if lm else []) + ([("vision", r) for r in rows] if vision else [])
            self._precapture_plan = sorted(plan, key=lambda kv: kv[1] if kv[0] == "lm" else kv[1] // 3)  # pop(): largest
        while self._precapture_plan and self._prefill_graphs_ok:
            kind, size = self._precapture_plan.pop()
            if kind == "lm" and size not in self._packed_graphs:
                self._precapture_lm(size)
                return True
            if kind == "vision" and len(self._vision_graphs) < VISION_GRAPHS:
                span = self.vision.span_for(size)  # lines that fit VISION_SPAN: what a prefill of them asks for
                if (size, span) not in self._vision_graphs:
                    self._precapture_vision(size, span)
                    return True
        return False

    def _vision_out(self, rows: int, like=None):
        """Where the vision graph of *rows* padded patch rows writes its result, (1 + deepstack layers, rows /
        merge, H): a view of one buffer that every vision graph shares (the shape of *like*, an eager result,
        or of the graphs' before it). They replay one at a time on one stream, and each result is read (copied
        into the prompt's embeddings and the deepstack inputs) before the next replay: one buffer of the largest
        result instead of one per row count (~8 KB per row: 65 row counts up to 16,640 rows held ~4.5 GB)."""
        if like is None:
            like = self._vision_out_buf[1]
        d, h = int(like.shape[0]), int(like.shape[-1])
        need = d * (rows // self.vision.merge) * h
        buf = self._vision_out_buf[0]
        if buf is None or buf.numel() < need:  # sized at first for the largest precapture_next prepares
            most = d * (self.vision.rows_for(self.prefill_chunk * 4 * ROW_BUCKET) // self.vision.merge) * h
            buf = self.torch.empty((max(need, most),), dtype=like.dtype, device=self.device)  # outgrown: kept by
            self._vision_out_buf[0] = buf  # the graphs that write into it
        view = buf[:need].view(d, rows // self.vision.merge, h)
        self._vision_out_buf[1] = view
        return view

    def _precapture_lm(self, width: int) -> None:
        """:meth:`precapture_next` for the language model's packed graph of *width* tokens."""
        g0 = next(iter(self._packed_graphs.values()))
        with self.torch.inference_mode():
            args = [a.new_zeros((3, width) if i == 1 else a.shape if i in (4, 5) else (width, *a.shape[1:]))
                    for i, a in enumerate(g0.inputs)]  # as _packed_layers takes them: pos3 (3, T); cu, last fixed
            inputs = self._static_inputs(self._packed_buffers, args, width, max(width, PACKED_BUFFER_TOKENS))
            if self._capture_packed(width, inputs) is not None:
                self.precaptured += 1

    def _capture_packed(self, width: int, inputs: list) -> _PrefillGraph | None:
        """The language model's packed graph of *width* tokens reading the static *inputs*, captured directly
        (:meth:`_record`) and kept; None where the capture failed."""
        like = next(iter(self._packed_graphs.values())).out  # (lines a packed graph takes, H) for every width
        g = self._record(lambda: self._packed_layers(*inputs), inputs, like, [], direct=True)
        if g is not None:
            self._packed_graphs[width] = g
        return g

    def _capture_vision(self, rows: int, inputs: list, span: int) -> _PrefillGraph | None:
        """The vision tower's graph of *rows* padded patch rows, its attention told *span* (the longest image:
        :meth:`htrd.vision.VisionTower.span_for`), reading the static *inputs*, captured directly into the
        shared output (:meth:`_vision_out`) and kept; None where the capture failed."""
        g = self._record(lambda: self.vision.padded(*inputs, span=span), inputs, None, [], direct=True,
                         out=self._vision_out(rows))
        if g is not None:
            self._vision_graphs[(rows, span)] = g
        return g

    def _precapture_vision(self, rows: int, span: int) -> None:
        """:meth:`precapture_next` for the vision tower's graph of *rows* padded patch rows told *span*."""
        g0 = next(iter(self._vision_graphs.values()))
        with self.torch.inference_mode():
            args = [a.clone() if a.dtype == self.torch.int32 else a.new_zeros((rows, *a.shape[1:]))
                    for a in g0.inputs]  # patches, position embeddings, cos, sin (per row); the blocks' bounds
            inputs = self._static_inputs(self._vision_buffers, args, rows, PREFILL_GRAPH_LINES * 4 * ROW_BUCKET)
            if self._capture_vision(rows, inputs, span) is not None:
                self.precaptured += 1

    def _vision_replayed(self, pixel_values, layout):
        """The vision tower of a prefill over its patches padded to a 256-row bucket
        (:meth:`htrd.vision.VisionTower.padded`, the attention blocks' boundaries padded to ``prefill_chunk``
        images), replayed from a CUDA graph per padded row count and span (the longest image the attention is
        told of: :meth:`htrd.vision.VisionTower.span_for`) -- captured on that pair's first prefill, whatever
        its number of lines. Eagerly, lines of many sizes attended in one call per size, per layer: ~2,000
        launches for 16 lines. Returns the real images' (image tokens, deepstack features)."""
        vt = self.vision
        patches = int(pixel_values.shape[0])
        rows = vt.rows_for(patches)  # with the span below, the graph's key
        blocks = self.prefill_chunk
        # What the attention is told of the longest image: VISION_SPAN, or the rows where an image is longer
        # (a graph of its own: the span is baked into a capture)
        span = vt.span_for(rows, layout.vision_lengths)
        g = self._vision_graphs.get((rows, span))
        if g is not None:
            vt.padded_inputs(pixel_values, layout.grids, layout.vision_lengths, rows, into=g.inputs, blocks=blocks)
            g.graph.replay()
            self.vision_replays += 1
            out = g.out
        else:
            args = vt.padded_inputs(pixel_values, layout.grids, layout.vision_lengths, rows, blocks=blocks)
            room = len(self._vision_graphs) < VISION_GRAPHS
            out = None
            if room:
                # sized at first for PREFILL_GRAPH_LINES lines of up to 1,024 patches (a 2,000 x 128 px line)
                inputs = self._static_inputs(self._vision_buffers, args, rows, PREFILL_GRAPH_LINES * 4 * ROW_BUCKET)
                if self._vision_graphs:  # a new row count of a captured kind: capture, then replay
                    g = self._capture_vision(rows, inputs, span)
                    if g is not None:
                        g.graph.replay()
                        out = g.out
            if out is None:
                out = vt.padded(*args, span=span)  # eagerly first: the capture then finds every kernel it records
                if room:
                    g = self._record(lambda: vt.padded(*inputs, span=span), inputs, out, [],
                                     out=self._vision_out(rows, out))
                    if g is not None:
                        self._vision_graphs[(rows, span)] = g
        k = patches // vt.merge
        return out[0, :k], [d[:k] for d in out[1:]]

    def _prompt_forward(self, input_ids, pixel_values, attention_mask, position_ids, image_index, st, grid_thw,
                        layout):
        """The prompts of a prefill batch through the model; keys and values land in the slots *st*. Returns
        the final hidden state (normed) of each line's last position, (n, H).

        The vision tower (:class:`htrd.vision.VisionTower`: patches -> image tokens and the deepstack
        features); everything around it on host-known indices (:func:`htrd.model.prompt_layout`): the image
        tokens placed by index, M-RoPE positions from the per-grid cache. HF's multimodal forward would wait
        for the GPU four times per prefill to learn the same (placeholder count, split sizes, rope index,
        deepstack mask), and its vision tower once per layer; a one-line prefill was bound by those waits.
        Nothing in here asks the GPU for a value, so it can be captured (:meth:`_record`).
        """
        embeds, deepstack = self._prompt_inputs(input_ids, pixel_values, image_index, grid_thw, layout)
        return self._prefill_layers(embeds, attention_mask, position_ids, image_index, deepstack, st)[:, -1]

    def _prefill_layers(self, h, attention_mask, position_ids, vis, deepstack, st):
        """The language model over a left-padded prompt batch, keys and values written straight into the
        slots *st*: the decode step's fused weights and ops over every prompt token (one GEMM for q/k/v,
        one for gate/up, fused norms), no cache copied afterwards. *vis*: flat positions of the image
        tokens, where the vision tower's *deepstack* features join the first layers. Returns the final
        norm of every position, (n, P, H)."""
        torch = self.torch
        F = torch.nn.functional
        n, P, H = h.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        dev = h.device
        cos, sin = self.text.rotary_emb(h, position_ids)  # (n, P, hd); position_ids (3, n, P)
        cos, sin = cos.reshape(n * P, 1, hd), sin.reshape(n * P, 1, hd)
        # Causal over real tokens; a padding query sees itself (no all-masked row: no NaN in its values).
        allowed = torch.ones((P, P), dtype=torch.bool, device=dev).tril()[None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
        allowed = allowed | torch.eye(P, dtype=torch.bool, device=dev)[None]
        bias = torch.zeros((allowed.shape[0], 1, P, P), dtype=h.dtype, device=dev).masked_fill_(
            ~allowed[:, None], float("-inf"))
        g = nh // nkv

        def attend(li, att, q, k, v):
            q = q.reshape(n, P, nh, hd).transpose(1, 2)
            k = k.reshape(n, P, nkv, hd).transpose(1, 2)
            v = v.reshape(n, P, nkv, hd).transpose(1, 2)
            self.k_cache[li][st, :, :P] = k
            self.v_cache[li][st, :, :P] = v
            k = k[:, :, None].expand(n, nkv, g, P, hd).reshape(n, nh, P, hd)
            v = v[:, :, None].expand(n, nkv, g, P, hd).reshape(n, nh, P, hd)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=att.scaling)
            return o.transpose(1, 2).reshape(n * P, nh * hd)

        x = self._layers(h.reshape(n * P, H), cos, sin, attend, vis, deepstack)
        return x.view(n, P, H)

    def _layers(self, h, cos, sin, attend: Callable, vis=None, deepstack: Sequence = ()):
        """The decoder layers over rows *h* (decode steps: one per slot; prefills: one per prompt token), on
        the fused weights and the compiled ops (one GEMM for q/k/v, one for gate/up, fused norms) -- the decode
        step and both prefills. *attend(li, att, q, k, v)* stores layer *li*'s keys and values where its caller
        keeps them and returns the attention output (rows, heads x head_dim); *vis*: the rows of the image
        tokens, where the vision tower's *deepstack* features join the first layers. Returns the final norm of
        every row."""
        F = self.torch.nn.functional
        ops = self._ops
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = ops.rms(h, self.layers[0].input_layernorm.weight, self.eps)
        for li, layer in enumerate(self.layers):
            att = layer.self_attn
            qkv = F.linear(x, self._qkv_w[li])
            q, k, v = ops.qk(qkv, att.q_norm.weight, att.k_norm.weight, cos, sin, nh, nkv, hd, self.eps)
            h, x = ops.add_rms(h, F.linear(attend(li, att, q, k, v), att.o_proj.weight),
                               layer.post_attention_layernorm.weight, self.eps)
            d = F.linear(self._silu_mul(F.linear(x, self._gu_w[li])), layer.mlp.down_proj.weight)
            nxt_w = self.layers[li + 1].input_layernorm.weight if li + 1 < len(self.layers) else self.text.norm.weight
            if li < len(deepstack):  # deepstack: the vision tower's layer features join here
                h = h + d
                h.index_add_(0, vis, deepstack[li].to(h.device, h.dtype))
                x = ops.rms(h, nxt_w, self.eps)
            else:
                h, x = ops.add_rms(h, d, nxt_w, self.eps)
        return x

    def _decode_attention_fn(self, B: int, L: int, kv_at):
        """The decode rows' attention for slots [:B] (cache rows *kv_at* of their new keys, :func:`kv_rows`),
        over cache positions [:L], with :attr:`decode_attention`'s kernel: ``attention(q, k_cache, v_cache, *,
        scale)``, *q* (B, n_kv, g, head_dim) -> (B * n_kv, g, head_dim) or, SDPA, (B, n_kv, g, head_dim). The
        decode step's and the mixed step's decode rows (the kernel chosen at start for one query a (slot, KV
        head)); SDPA marks the rows' new positions in its mask, the only reader of it. Only touches fixed
        buffers: captured with its step."""
        torch = self.torch
        pos = self.pos[:B]
        if self.decode_attention != "sdpa":  # each slot's keys from its first position on, none past its own
            cu_k, used = kv_spans(kv_at, self.kv_first[:B], pos, self.max_cache_len)
        if self.decode_attention == "triton":
            splits = decode_splits(B * self.n_kv, self._sms)

            def attention(q, k_cache, v_cache, *, scale):
                k_rows = k_cache.view(-1, self.head_dim)  # the cache's rows without the scratch row
                return triton_decode(q.reshape(B * self.n_kv, -1, self.head_dim), k_rows,
                                     v_cache.view(-1, self.head_dim), scale=scale, start=cu_k[:-1], used=used,
                                     splits=splits)
            return attention
        if self.decode_attention == "flash":
            return functools.partial(flash_decode, cu_q=self.cu_q[: B * self.n_kv + 1], cu_k=cu_k, used=used, span=L)
        self.attend.index_put_((self.rows[:B], pos), self._true)  # a device scalar: no host copy inside a graph
        # Additive mask, built once per step (SDPA would convert a boolean one in every layer). Reads every
        # position of the span for every slot.
        bias = torch.zeros((B, 1, 1, L), dtype=self.dtype, device=self.device).masked_fill_(
            ~self.attend[:B, None, None, :L], float("-inf"))
        return functools.partial(sdpa_decode, bias=bias, span=L)

    def _decode_step(self, B: int, L: int) -> None:
        """One greedy token for slots [:B], attending over cache positions [:L]. Only touches fixed buffers."""
        torch = self.torch
        F = torch.nn.functional
        rows = self.rows[:B]
        pos = self.pos[:B]
        # Where each slot's new key/value goes in a layer's cache seen as rows of head_dim: one index_copy_ each.
        kv_at = kv_rows(rows, self.kv_heads, pos, self.max_cache_len)
        attention = self._decode_attention_fn(B, L, kv_at)
        h = self.text.embed_tokens(self.tok[:B, 0])  # (B,H)
        rope = (pos + self.delta[:B]).view(1, B, 1).expand(3, B, 1)
        cos, sin = self.text.rotary_emb(h, rope)  # (B,1,hd)
        nh, hd, nkv = self.n_heads, self.head_dim, self.n_kv
        # Finished and free slots write to the scratch row: a slot being prefilled by mixed steps must keep its
        # prompt's keys (its decode row is inert until its first token).
        kv_flat = torch.where(self.finished[:B, None], self._scratch_row, kv_at).reshape(-1)

        def attend(li, att, q, k, v):
            self._k_rows[li].index_copy_(0, kv_flat, k.reshape(B * nkv, hd))
            self._v_rows[li].index_copy_(0, kv_flat, v.reshape(B * nkv, hd))
            # GQA with one query token: each KV head's g query heads ride on the query-length axis.
            return attention(q, self.k_cache[li], self.v_cache[li], scale=att.scaling).reshape(B, nh * hd)

        x = self._layers(h, cos, sin, attend)
        logits = F.linear(x, self.lm_head.weight).float()  # x: the final norm's output
        self._select(logits, B)

    def _select(self, logits, B: int) -> None:
        """Greedy next token per slot; EOS suppressed below the slot's min_new; finished slots frozen."""
        torch = self.torch
        rows = self.rows[:B]
        nstep = self.nstep[:B]
        fin = self.finished[:B]
        logits = torch.where((nstep < self.lim_min[:B])[:, None], logits + self.eos_bias, logits)
        nxt = torch.argmax(logits, dim=-1)
        nxt = torch.where(fin, torch.full_like(nxt, self.pad_id), nxt)
        self.out[rows, nstep.clamp(max=self.out.shape[1] - 1)] = nxt
        active = (~fin).long()
        eos_hit = (nxt[:, None] == self.eos[None, :]).any(dim=1)
        nstep.add_(active)
        self.pos[:B].add_(active)
        fin |= eos_hit | (nstep >= self.lim_max[:B])
        self.tok[:B, 0] = nxt

    # ------------------------------------------------------------------ graphs
    def _capture(self, B: int, L: int) -> _Graph | None:
        """Capture the decode step for (B, L). Runs the step on the live buffers: only while no line runs."""
        if (B, L) not in self._graphs:
            graph = self._capture_step(lambda: self._step_fn(B, L), B, f"decode graph span={L}")
            self._graphs[(B, L)] = _Graph(graph, B, L)
        return self._graphs[(B, L)]

    def _capture_mixed(self, B: int, T: int) -> _Graph:
        """Capture the mixed step for B decode rows and T prompt rows, on inputs of padding only (every replay
        writes its own first: :meth:`_launch_mixed`). Like :meth:`_capture`, only while no line runs."""
        if (B, T) not in self._mixed_graphs:
            self._mixed_buffer(T).copy_(self._mixed_host(StepPlan(), T).to(self.device))
            graph = self._capture_step(lambda: self._mixed_step(B, T), B, f"mixed graph tokens={T}")
            self._mixed_graphs[(B, T)] = _Graph(graph, B, T)
        return self._mixed_graphs[(B, T)]

    def _capture_step(self, fn: Callable[[], None], B: int, what: str):
        """Capture *fn* (a step over B slots' rows), run first on a side stream (cuBLAS and inductor choose
        their kernels outside the capture): twice for a batch size not seen yet (torch.compile specialises,
        cuBLAS picks kernels), then once."""
        torch = self.torch
        t0 = time.perf_counter()
        seen = any(b == B for b, _ in self._graphs) or any(b == B for b, _ in self._mixed_graphs)
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(1 if seen else 2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                fn()
            torch.cuda.synchronize(self.device)
        logger.debug("captured %s batch=%d in %.0f ms", what, B, (time.perf_counter() - t0) * 1e3)
        return graph

    def spans(self, min_prompt: int = 1) -> list[int]:
        """The attention spans (L buckets) a line of at least *min_prompt* prompt tokens can need: one per
        SPAN_BUCKET positions with SDPA, which reads the whole span; with flash attention only the whole cache
        (it reads each line's own keys whatever the span: one decode graph per batch size)."""
        if self.decode_attention != "sdpa":
            return [self.max_cache_len]
        lo = min(_round_up(min_prompt + 1, SPAN_BUCKET), self.max_cache_len)
        return sorted(set(range(lo, self.max_cache_len, SPAN_BUCKET)) | {self.max_cache_len})

    def _span_for(self, need: int) -> int:
        """The span (L bucket) of a decode step whose running lines reach cache position *need*."""
        if self.decode_attention != "sdpa":
            return self.max_cache_len
        return min(_round_up(need, SPAN_BUCKET), self.max_cache_len)

    # ------------------------------------------------------------------ warmup
    def warmup(self, image=None, *, max_new_tokens: int | None = None,
               progress: Callable[[str], None] = lambda s: None) -> dict:
        """Every shape served, before READY: a decode graph for every (batch bucket, span) pair on CUDA,
        then prefills of every chunk size up to ``prefill_chunk`` (and a full generate) on a real line image.

        Must run on the thread that will serve (the engine's inference thread): cuBLAS handles and
        workspaces are per thread, and a first batch on a new thread costs ~0.1 s more.
        """
        from .model import warmup_image

        if self.running():
            raise RuntimeError("warmup while lines are running")
        t0 = time.perf_counter()
        prep = self.prepare(image if image is not None else warmup_image())
        max_new = int(max_new_tokens or self.max_new_tokens)
        n_graphs = 0
        if self.cuda_graphs:
            spans = self.spans()
            with self.torch.inference_mode():
                for b in self.batch_sizes:
                    progress(f"capturing decode graphs for batch size {b} (of {self.batch_sizes[-1]})")
                    for L in spans:
                        self._capture(b, L)
                        n_graphs += 1
                    if self.mixed:  # one graph per (batch size, budget)
                        for T in self.prefill_budgets:
                            self._capture_mixed(b, T)
                            n_graphs += 1
                self._reset_slots(list(range(self.slots)))
        t_graphs = time.perf_counter()
        with self.torch.inference_mode():
            batch, layout = self._collate([prep]), prompt_layout([prep], device=self.device)
            with _no_cudnn_attention(self.torch):  # as in every prefill
                self.vision.check(batch["pixel_values"], batch["image_grid_thw"], layout.grids, layout.vision_lengths)
        report = {}
        sizes = sorted({b for b in self.batch_sizes if b <= self.prefill_chunk} | {min(self.prefill_chunk, self.slots)})
        for b in sizes:
            progress(f"warming up prefills of {b} line(s)")
            tb = time.perf_counter()
            # Small prefills until the warm-up line's shape is captured (see PREFILL_GRAPH_LINES).
            small = self._prefill_graphs_ok and not self.packed and b <= PREFILL_GRAPH_LINES
            for _ in range(PREFILL_GRAPH_AFTER if small else 1):
                self.generate([prep] * b, max_new_tokens=min(max_new, 4), decode_text=False)
            report[b] = round((time.perf_counter() - tb) * 1000.0, 1)
        # Then several prefill chunks back to back and their decode steps together (the path of a burst). Not
        # every slot: each size's decode graph is captured above, and 256 lines' prefills would add ~2.4 s to
        # READY on an H200 for nothing new.
        full = min(self.slots, 2 * self.prefill_chunk)
        progress(f"warming up a batch of {full} (of {self.slots} slots)")
        self.generate([prep] * full, max_new_tokens=min(max_new, 8), decode_text=False)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        self.steps_run = self.occupied_sum = self.step_calls = self.turnarounds = self.mixed_steps = 0
        self.turnaround_s, self._idle_since = 0.0, None
        took = time.perf_counter() - t0
        logger.info("fast path warm in %.1f s: %d decode graphs in %.1f s, prefills of %s", took, n_graphs,
                    t_graphs - t0, sizes)
        return {"warmup_s": took, "graphs": n_graphs, "graphs_s": t_graphs - t0, "per_batch_ms": report,
                "prompt_tokens": prep.prompt_len}


def _rms(x, w, eps: float):
    """Qwen3's RMSNorm, as HF computes it (fp32 statistics, weight applied in the input dtype)."""
    import torch

    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _add_rms(h, d, w, eps: float):
    h = h + d
    return h, _rms(h, w, eps)


def _rotate_half(x):
    import torch

    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _qk(qkv, qw, kw, cos, sin, nh: int, nkv: int, hd: int, eps: float):
    """Split the fused projection, q/k RMSNorm, rotary embedding; q folded to (B, nkv, g, hd)."""
    B = qkv.shape[0]
    q = qkv[:, : nh * hd].view(B, nh, hd)
    k = qkv[:, nh * hd : (nh + nkv) * hd].view(B, nkv, hd)
    v = qkv[:, (nh + nkv) * hd :].view(B, nkv, 1, hd)
    q = _rms(q, qw, eps)
    k = _rms(k, kw, eps)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q.view(B, nkv, nh // nkv, hd), k.view(B, nkv, 1, hd), v


def _silu_mul(gu):
    import torch

    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


class _Ops:
    """The elementwise pieces of the decode step and the prefill: plain PyTorch, or each compiled by inductor
    (fused kernels).

    One compiled copy per function serves every layer, every batch bucket and every prefill: both pass rows
    (batch lines, or prompt tokens) x features, so after the first two row counts (batch 1, then batch 2:
    torch.compile's automatic dynamic shapes) one graph with a dynamic row count serves every later call --
    8 compilations before READY, not the 16 of separate prefill copies (each ~0.5 s even from the persistent
    compile cache, :func:`configure_compile_cache`). A prompt length not seen in the warm-up reuses it.
    """

    def __init__(self, torch, *, compile: bool) -> None:
        fns = {"rms": _rms, "add_rms": _add_rms, "qk": _qk, "silu_mul": _silu_mul}
        for name, fn in fns.items():
            setattr(self, name, torch.compile(fn, dynamic=None, fullgraph=True) if compile else fn)


_OPS: dict[bool, _Ops] = {}


def _ops(torch, *, compile: bool) -> _Ops:
    """The process's ops (one per *compile*): compiled graphs live on the functions' code, and a generator
    built after :func:`precompile_ops` finds the graphs it compiled."""
    if compile not in _OPS:
        _OPS[compile] = _Ops(torch, compile=compile)
    return _OPS[compile]


def precompile_ops(text_config: dict, *, device: str, dtype_name: str) -> int:
    """Compile the ops (:class:`_Ops`) for rows of 1 and of 2 on stand-in tensors of the language model's sizes
    (*text_config*: the model's ``config.json`` ``text_config``) -- the two compilations per function every
    warm-up needs (batch 1, then the dynamic row count). Meant for a thread while the weights load: each
    compilation takes ~0.5 s even from the persistent cache, and the first ~2 s more (inductor's imports).
    Returns the number of calls made. The stand-ins match the real calls' guards (dtype, device, layout,
    inference mode, parameters); any call that does not just compiles once more in the warm-up."""
    import torch

    hidden, heads = int(text_config["hidden_size"]), int(text_config["num_attention_heads"])
    kv = int(text_config.get("num_key_value_heads") or heads)
    hd = int(text_config.get("head_dim") or hidden // heads)
    inter, eps = int(text_config["intermediate_size"]), float(text_config["rms_norm_eps"])
    dtype, dev = getattr(torch, dtype_name), torch.device(device)
    ops = _ops(torch, compile=True)

    def weight(n: int):
        return torch.nn.Parameter(torch.ones(n, dtype=dtype, device=dev), requires_grad=False)

    w, qw, kw = weight(hidden), weight(hd), weight(hd)
    calls = 0
    with torch.inference_mode():
        for rows in (1, 2):
            x = torch.zeros((rows, hidden), dtype=dtype, device=dev)
            ops.rms(x, w, eps)
            ops.add_rms(x, torch.zeros_like(x), w, eps)
            qkv = torch.zeros((rows, (heads + 2 * kv) * hd), dtype=dtype, device=dev)
            cos = torch.zeros((rows, 1, hd), dtype=dtype, device=dev)
            ops.qk(qkv, qw, kw, cos, torch.zeros_like(cos), heads, kv, hd, eps)
            ops.silu_mul(torch.zeros((rows, 2 * inter), dtype=dtype, device=dev))
            calls += 4
    return calls


def _no_cudnn_attention(torch):
    """SDPA without its cuDNN backend, for prefills. cuDNN (torch's first choice on an H100/H200) builds an
    execution plan for every new shape: ~50 ms of host time for a prefill of a new prompt length or image size,
    ~1 s for the first (measured on an H200, torch 2.11), and line images come in hundreds of sizes; flash
    attention (the vision tower) and memory-efficient attention (masked prompts) need no plan. The decode step's
    few fixed shapes keep cuDNN (its plans are built before READY; measured faster there: a 50-token line took
    ~25 ms longer with it off)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _seen(counts: OrderedDict, key) -> int:
    """Count one more sighting of *key*; returns the count (the least recently seen of 1,024 keys forgotten)."""
    seen = counts.pop(key, 0) + 1
    counts[key] = seen
    if len(counts) > 1024:
        counts.popitem(last=False)
    return seen


def _pack_width(tokens: int) -> int:
    """The padded token count of a packed prefill of *tokens* prompt tokens (one CUDA graph each): rounded up
    to an eighth of its power of two, at least PACK_MIN -- at most 12.5 % padding, 8 widths per doubling
    (~45 for prefills of up to 16 lines of 1,024 tokens)."""
    step = max(PACK_MIN, (1 << (max(tokens, 1).bit_length() - 1)) // 8)
    return _round_up(tokens, step)


def _budgets(tokens: int, max_cache_len: int) -> list[int]:
    """A mixed step's prompt-token budgets (one graph per decode bucket each): MIXED_BUDGETS even steps up to
    *tokens*, multiples of 8, at most the cache's length (a budget's padding attends to the cache's first rows)."""
    top = max(8, min(_round_up(int(tokens), 8), max_cache_len))
    return sorted({max(8, _round_up(top * i // MIXED_BUDGETS, 8)) for i in range(1, MIXED_BUDGETS + 1)})


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def _fuse_rows(linears, torch, nn):
    """Concatenate the weights of *linears* (same input) into one matrix, one GEMM for all of them,
    and make each module's weight a view of its rows, so both paths read the same memory."""
    fused = torch.cat([m.weight for m in linears])
    off = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[off : off + n], requires_grad=False)
        off += n
    return fused
