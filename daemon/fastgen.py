"""The fast generation path: merged weights, a static KV cache and CUDA-graph decoding.

What the engine gets from :class:`FastGenerator` compared with the naive
``base + PeftModel + generate`` path (DESIGN.md, "Reference measurements"):

- **Merged LoRA.** The adapter is folded into the base weights at load
  (``merge_and_unload``) unless the directory already holds a ``merged/``
  variant (``htrctl provision --merge``); decoding then runs plain linear
  layers, no per-layer adapter matmuls.
- **SDPA attention** (``attn_implementation="sdpa"``) for the prefill (vision
  tower and prompt), and ``scaled_dot_product_attention`` in the decode step.
- **A static KV cache and a captured decode step.** The prompt is prefilled by
  the HF model (eager, exact M-RoPE positions, deepstack features); its keys
  and values are copied into a preallocated cache of fixed shape. Each decode
  step -- embedding, 36 layers, the LM head, greedy argmax, EOS bookkeeping --
  reads and writes only fixed buffers, so on CUDA it is captured once per
  (batch bucket, cache-length bucket) as a CUDA graph and replayed: one launch
  per token instead of ~1,000 kernel launches from Python. Optionally the step
  is compiled with ``torch.compile`` first (``compile=True``), with its
  inductor/triton caches in a persistent directory so restarts do not
  recompile.
- **Bucketed batch sizes** (the configured ``limits.batch_sizes``): a batch is
  padded to the next bucket with inert rows; every bucket is captured during
  :meth:`FastGenerator.warmup`, before the daemon reports READY.
- **Preprocessing off the GPU thread:** :meth:`FastGenerator.prepare` (chat
  template, tokenizer, image processor) is thread-safe CPU work the server can
  run in request threads; :meth:`FastGenerator.generate` only collates and
  runs the model.

Greedy decoding gives the same tokens as ``model.generate(do_sample=False)``
on the same weights (tests/test_fastgen.py checks it against the naive path on
the demo model). On CPU the same step runs eagerly (no graphs): that is what
the tests exercise.

Nothing here imports torch at module level; the engine imports this module
only after the GPU is pinned.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MERGED_DIRNAME = "merged"
ADAPTER_DIRNAME = "final_model"
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
LENGTH_BUCKET = 64  # cache lengths are rounded up to a multiple of this
CHECK_EVERY = 8  # decode steps between host checks for "all rows finished"


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


def resolve_variant(model_dir: Path, variant: str = "auto") -> str:
    """``merged`` when ``<dir>/merged/config.json`` exists (or is required), else ``adapter``."""
    has_merged = (Path(model_dir) / MERGED_DIRNAME / "config.json").is_file()
    if variant == "merged":
        if not has_merged:
            from htrctl.errors import ModelMissingError

            raise ModelMissingError(
                f"{model_dir}/{MERGED_DIRNAME}/ is missing but model.variant is 'merged'; "
                f"run `htrctl provision --merge` or set model.variant: auto"
            )
        return "merged"
    if variant == "adapter":
        return "adapter"
    return "merged" if has_merged else "adapter"


def load_merged_model(model_dir: str | os.PathLike, *, device: str, dtype: Any, variant: str = "auto"):
    """Load the model with the LoRA folded in; return ``(model, variant_used)``.

    ``merged``: the pre-merged weights in ``<dir>/merged/``. ``adapter``: the
    base at ``<dir>`` plus ``<dir>/final_model`` through PEFT, merged here with
    ``merge_and_unload`` (same result, a second or so more at load). Local
    files only, safetensors only, the whole model on *device*.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    model_dir = Path(model_dir)
    used = resolve_variant(model_dir, variant)
    common = dict(
        dtype=dtype,
        attn_implementation="sdpa",
        local_files_only=True,
        use_safetensors=True,
        device_map={"": device},
    )
    if used == "merged":
        model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir / MERGED_DIRNAME, **common)
    else:
        from peft import PeftModel

        base = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, **common)
        adapter = model_dir / ADAPTER_DIRNAME
        if (adapter / "adapter_config.json").is_file():
            peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=False, local_files_only=True)
            model = peft_model.merge_and_unload()
        else:
            logger.warning("no adapter in %s: serving the base weights alone", adapter)
            model = base
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
    return model, used


@dataclass
class Prepared:
    """One image, preprocessed on the CPU and ready to be collated into a batch."""

    input_ids: Any  # LongTensor (S,)
    mm_token_type_ids: Any | None  # IntTensor (S,) or None (older transformers)
    pixel_values: Any  # FloatTensor (patches, dim)
    image_grid_thw: Any  # LongTensor (1, 3)
    rope_span: int  # max M-RoPE position + 1 over the prompt
    preprocess_ms: float = 0.0

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Generated:
    """Greedy output for one image: token ids (through the first EOS, if any) and text."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    batch_size: int
    generate_ms: float = 0.0
    stats: dict = field(default_factory=dict)


class _Graph:
    __slots__ = ("graph", "batch", "length")

    def __init__(self, graph, batch: int, length: int):
        self.graph = graph
        self.batch = batch
        self.length = length


class FastGenerator:
    """Greedy batched generation over a loaded, merged Qwen3-VL model.

    Not thread-safe for :meth:`generate` (one GPU thread calls it);
    :meth:`prepare` may be called from any thread.
    """

    def __init__(
        self,
        model,
        processor,
        *,
        prompt: str,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        max_cache_len: int = 1024,
        max_new_tokens: int = 256,
        cuda_graphs: bool | None = None,
        compile: bool = False,
    ) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.processor = processor
        self.prompt = prompt
        self.batch_sizes = sorted({int(b) for b in batch_sizes})
        self.max_batch = self.batch_sizes[-1]
        self.max_new_tokens = int(max_new_tokens)
        self.max_cache_len = _round_up(int(max_cache_len), LENGTH_BUCKET)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        self.compile = bool(compile)

        cfg = model.config
        tcfg = cfg.text_config
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        self.layers = list(self.text.layers)
        self.n_heads = tcfg.num_attention_heads
        self.n_kv = tcfg.num_key_value_heads
        self.head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
        self.merge = cfg.vision_config.spatial_merge_size
        self.image_token_id = cfg.image_token_id
        self.eps = float(tcfg.rms_norm_eps)

        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tcfg.eos_token_id
        self.eos_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
        pad = gen.pad_token_id if gen.pad_token_id is not None else getattr(tcfg, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self._chat_text = self._build_chat_text()
        self._lock = threading.Lock()  # serialises generate() (one GPU stream)
        self._gpu_thread = None
        if self.device.type == "cuda":
            from concurrent.futures import ThreadPoolExecutor

            self._gpu_thread = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="htrd-gpu", initializer=torch.cuda.set_device, initargs=(self.device,)
            )
        self._tls = threading.local()
        self._processors: list = []  # idle processor copies, one per concurrent prepare
        self._proc_lock = threading.Lock()
        self._spare_processors(min(16, os.cpu_count() or 4))  # requests right after READY find warm copies
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None
        self._alloc_state()
        self._fuse_weights()
        self._batch_vision_attention()
        self._ops = _Ops(torch, compile=self.compile)
        if self.compile:
            self._compile_prefill()
        self._step_fn = self._decode_step

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        *,
        device: str = "cuda",
        dtype: str | Any = "auto",
        variant: str = "auto",
        prompt: str,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        max_cache_len: int = 1024,
        max_new_tokens: int = 256,
        compile: bool = False,
        cuda_graphs: bool | None = None,
    ) -> FastGenerator:
        import torch
        from transformers import AutoProcessor

        if isinstance(dtype, str):
            if dtype == "auto":
                dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
            else:
                dtype = getattr(torch, dtype)
        model, used = load_merged_model(model_dir, device=device, dtype=dtype, variant=variant)
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        gen = cls(
            model,
            processor,
            prompt=prompt,
            batch_sizes=batch_sizes,
            max_cache_len=max_cache_len,
            max_new_tokens=max_new_tokens,
            compile=compile,
            cuda_graphs=cuda_graphs,
        )
        gen.variant = used
        return gen

    variant: str = "merged"

    @classmethod
    def from_loaded(cls, model, processor, settings) -> FastGenerator:
        """Build from the daemon's loaded model (a PeftModel is merged here) and its settings."""
        gen_s = settings.generation
        variant = "merged"
        if hasattr(model, "merge_and_unload"):  # base + adapter: fold the LoRA into the weights
            t0 = time.perf_counter()
            model = model.merge_and_unload()
            variant = "adapter"
            logger.info("LoRA merged into the weights in %.2f s", time.perf_counter() - t0)
        model.eval()
        cuda = next(model.parameters()).device.type == "cuda"
        if cuda and gen_s.compile:
            configure_compile_cache(gen_s.compile_cache_dir)
        gen = cls(
            model,
            processor,
            prompt=gen_s.prompt,
            batch_sizes=settings.limits.batch_sizes,
            max_cache_len=gen_s.max_cache_len,
            max_new_tokens=gen_s.max_new_tokens,
            compile=cuda and gen_s.compile,
        )
        gen.variant = variant
        return gen

    # ------------------------------------------------------------ preprocessing
    def _build_chat_text(self) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prepare(self, image) -> Prepared:
        """Tokenise and preprocess one PIL image (CPU only; safe from any thread)."""
        t0 = time.perf_counter()
        image = image.convert("RGB")
        self._one_cpu_thread()
        proc = self._take_processor()
        try:
            enc = proc(text=[self._chat_text], images=[image], return_tensors="pt")
        finally:
            with self._proc_lock:
                self._processors.append(proc)  # LIFO: a lone client keeps reusing one warm copy
        input_ids = enc["input_ids"][0]
        grid = enc["image_grid_thw"]
        mm = enc.get("mm_token_type_ids")
        n_img = int((input_ids == self.image_token_id).sum())
        span = sum(int(max(int(h), int(w)) // self.merge) for _, h, w in grid.tolist())
        return Prepared(
            input_ids=input_ids,
            mm_token_type_ids=None if mm is None else mm[0],
            pixel_values=enc["pixel_values"].to(self.dtype),  # the vision tower casts to it anyway
            image_grid_thw=grid,
            rope_span=int(input_ids.shape[0]) - n_img + span,
            preprocess_ms=(time.perf_counter() - t0) * 1000.0,
        )

    def _one_cpu_thread(self) -> None:
        """On a GPU host, this preprocessing thread's torch CPU ops run on one core.

        The image processor's tensor ops (resize, normalise, patchify) parallelise
        over every core by default; with dozens of requests preprocessed at once
        that oversubscribes the CPU (each op waits for its whole thread team). The
        requests themselves are the parallelism. Not on a CPU-only host, where the
        model needs the cores.
        """
        if self.device.type != "cuda" or getattr(self._tls, "one_thread", False):
            return
        self.torch.set_num_threads(1)
        self._tls.one_thread = True

    def _take_processor(self):
        """An idle copy of the processor. A fast tokenizer must not serve two threads at once, and
        one shared lock would serialise the image preprocessing of a whole batch; copies are cheap
        (a few ms) and :meth:`warmup` makes some in advance."""
        with self._proc_lock:
            if self._processors:
                return self._processors.pop()
        return self._new_processor()

    def _new_processor(self):
        """A copy of the processor, used once on a blank line image: its first call is several
        times slower than later ones, and that must not land on a request."""
        import copy

        from PIL import Image

        proc = copy.deepcopy(self.processor)
        proc(text=[self._chat_text], images=[Image.new("RGB", (1200, 160), "white")], return_tensors="pt")
        return proc

    def _spare_processors(self, n: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="htrd-proc-warm") as pool:
            spare = list(pool.map(lambda _: self._new_processor(), range(n)))
        with self._proc_lock:
            self._processors.extend(spare)

    def _collate(self, items: Sequence[Prepared]) -> dict:
        torch = self.torch
        P = max(it.prompt_len for it in items)
        B = len(items)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        att = torch.zeros((B, P), dtype=torch.long)
        has_mm = items[0].mm_token_type_ids is not None
        mm = torch.zeros((B, P), dtype=items[0].mm_token_type_ids.dtype) if has_mm else None
        for i, it in enumerate(items):
            n = it.prompt_len
            ids[i, P - n :] = it.input_ids
            att[i, P - n :] = 1
            if has_mm:
                mm[i, P - n :] = it.mm_token_type_ids
        dev = self.device
        batch = {
            "input_ids": ids.to(dev, non_blocking=True),
            "attention_mask": att.to(dev, non_blocking=True),
            # Per-item copies concatenated on the device: no large CPU-side cat of the patches.
            "pixel_values": torch.cat([it.pixel_values.to(dev, self.dtype, non_blocking=True) for it in items]),
            "image_grid_thw": torch.cat([it.image_grid_thw for it in items]).to(dev, non_blocking=True),
        }
        if has_mm:
            batch["mm_token_type_ids"] = mm.to(dev, non_blocking=True)
        return batch

    # ------------------------------------------------------------------- state
    def _alloc_state(self) -> None:
        torch = self.torch
        dev, Bm, L = self.device, self.max_batch, self.max_cache_len
        shape = (Bm, self.n_kv, L, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers]
        self.attend = torch.zeros((Bm, L), dtype=torch.bool, device=dev)  # which cache slots a row sees
        self.tok = torch.zeros((Bm, 1), dtype=torch.long, device=dev)  # last token, input of the next step
        self.delta = torch.zeros((Bm,), dtype=torch.long, device=dev)  # rope position - cache index
        self.finished = torch.zeros((Bm,), dtype=torch.bool, device=dev)
        self.out = torch.zeros((Bm, L), dtype=torch.long, device=dev)  # generated tokens
        self.idx = torch.zeros((1,), dtype=torch.long, device=dev)  # cache slot of self.tok
        self.step = torch.zeros((1,), dtype=torch.long, device=dev)  # index of the token being produced
        self.min_new = torch.zeros((1,), dtype=torch.long, device=dev)
        self.eos = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)
        vocab = self.lm_head.weight.shape[0]
        self.eos_bias = torch.zeros((vocab,), dtype=torch.float32, device=dev)
        self.eos_bias[self.eos] = float("-inf")
        nbytes = 2 * len(self.layers) * math.prod(shape) * self.k_cache[0].element_size()
        logger.info("static KV cache: batch %d x %d slots, %.2f GiB", Bm, L, nbytes / 2**30)

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

    def _batch_vision_attention(self) -> None:
        """The vision tower's attention: one SDPA call per run of equal-sized images, not per image.

        HF's non-flash path loops over the images of a batch (27 layers x 64 line
        images = 1,728 small attention calls per prefill). Lines of one page
        are mostly the same size; consecutive images with the same patch count
        are stacked into one batched call. Same math (attention never crosses
        images).
        """
        import functools

        n = 0
        for mod in self.model.model.visual.modules():
            if type(mod).__name__.endswith("VisionAttention") and hasattr(mod, "qkv"):
                mod.forward = functools.partial(_vision_attention_forward, mod)
                n += 1
        logger.debug("vision attention batched in %d layers", n)

    def _compile_prefill(self) -> None:
        """Fused kernels for the prefill's elementwise work (the HF forward runs them op by op).

        The language model's RMSNorms (hidden, q and k) and MLP activations are
        ~40% of a batch-64 prefill in eager mode (fp32 up-casts over 18k tokens).
        Their forwards are swapped for compiled versions of the same math
        (dynamic shapes: one graph serves every layer and batch); the MLP also
        uses the fused gate/up weight. Numerically equivalent; the prompt's
        structure (vision tower, deepstack, M-RoPE) stays HF's.
        """
        import functools

        torch = self.torch
        rms = torch.compile(_rms, dynamic=True, fullgraph=True)
        silu_mul = torch.compile(_silu_mul, dynamic=True, fullgraph=True)
        norm_cls = type(self.text.norm)
        n = 0
        for mod in self.text.modules():
            if isinstance(mod, norm_cls):
                mod.forward = functools.partial(_norm_forward, rms, mod)
                n += 1
        for li, layer in enumerate(self.layers):
            layer.mlp.forward = functools.partial(_mlp_forward, silu_mul, self._gu_w[li], layer.mlp.down_proj)
        logger.info("prefill: %d RMSNorms and %d MLPs use compiled kernels", n, len(self.layers))

    def _decode_step(self, B: int, L: int) -> None:
        """One greedy token for rows [:B], reading cache slots [:L]. Only touches fixed buffers."""
        torch = self.torch
        F = torch.nn.functional
        ops = self._ops
        idx = self.idx
        self.attend[:B].index_fill_(1, idx, True)
        mask = self.attend[:B, None, None, :L]  # (B,1,1,L), True = attend
        h = self.text.embed_tokens(self.tok[:B, 0])  # (B,H)
        pos = (idx + self.delta[:B]).view(1, B, 1).expand(3, B, 1)
        cos, sin = self.text.rotary_emb(h, pos)  # (B,1,hd)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        g = nh // nkv
        x = ops.rms(h, self.layers[0].input_layernorm.weight, self.eps)
        for li, layer in enumerate(self.layers):
            att = layer.self_attn
            qkv = F.linear(x, self._qkv_w[li])
            q, k, v = ops.qk(qkv, att.q_norm.weight, att.k_norm.weight, cos, sin, nh, nkv, hd, self.eps)
            kc = self.k_cache[li][:B, :, :L]
            vc = self.v_cache[li][:B, :, :L]
            kc.index_copy_(2, idx, k)
            vc.index_copy_(2, idx, v)
            # GQA with one query token: each KV head's g query heads ride on the query-length axis.
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=att.scaling)
            h, x = ops.add_rms(h, F.linear(o.reshape(B, nh * hd), att.o_proj.weight),
                               layer.post_attention_layernorm.weight, self.eps)
            a = ops.silu_mul(F.linear(x, self._gu_w[li]))
            nxt_w = self.layers[li + 1].input_layernorm.weight if li + 1 < len(self.layers) else self.text.norm.weight
            h, x = ops.add_rms(h, F.linear(a, layer.mlp.down_proj.weight), nxt_w, self.eps)
        logits = F.linear(x, self.lm_head.weight).float()  # x: the final norm's output
        self._select(logits, B)
        idx.add_(1)

    def _select(self, logits, B: int) -> None:
        """Greedy choice for the token at index ``self.step``; EOS suppressed below ``min_new``."""
        torch = self.torch
        logits = torch.where(self.step < self.min_new, logits + self.eos_bias, logits)
        nxt = torch.argmax(logits, dim=-1)
        fin = self.finished[:B]
        nxt = torch.where(fin, torch.full_like(nxt, self.pad_id), nxt)
        self.out[:B].index_copy_(1, self.step, nxt.view(B, 1))
        fin |= (nxt[:, None] == self.eos[None, :]).any(dim=1)
        self.tok[:B, 0] = nxt
        self.step.add_(1)

    # ------------------------------------------------------------------ graphs
    def _graph_for(self, B: int, L: int) -> _Graph | None:
        if not self.cuda_graphs:
            return None
        key = (B, L)
        g = self._graphs.get(key)
        if g is not None:
            return g
        torch = self.torch
        t0 = time.perf_counter()
        with torch.cuda.device(self.device):
            # Warm the step on a side stream (cuBLAS/inductor autotuning happens outside capture), then capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._scratch_state(B)
                    self._step_fn(B, L)
            torch.cuda.current_stream().wait_stream(side)
            self._scratch_state(B)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step_fn(B, L)
            torch.cuda.synchronize(self.device)
        g = self._graphs[key] = _Graph(graph, B, L)
        logger.info("captured decode graph batch=%d cache_len=%d in %.0f ms", B, L, (time.perf_counter() - t0) * 1e3)
        return g

    def _scratch_state(self, B: int) -> None:
        """Harmless values for warm-up/capture runs (real batches reset everything they use)."""
        self.idx.fill_(0)
        self.step.fill_(0)
        self.min_new.fill_(0)
        self.finished[:B] = False
        self.attend[:B] = False
        self.tok[:B] = 0
        self.delta[:B] = 0

    # ---------------------------------------------------------------- generate
    def bucket_for(self, n: int) -> int:
        for b in self.batch_sizes:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the largest batch size {self.max_batch}")

    def generate(
        self,
        items: Sequence[Prepared],
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        decode_text: bool = True,
        on_progress: Callable[[int], bool] | None = None,
    ) -> list[Generated]:
        """Greedy-decode a batch of prepared images; one :class:`Generated` per item, in order.

        *on_progress(tokens_so_far)* is called after the prefill and every few
        decode steps (the watchdog's heartbeat); returning True stops early
        (e.g. every request's deadline has passed) with what exists so far.
        """
        if not items:
            return []
        if len(items) > self.max_batch:
            out: list[Generated] = []
            for i in range(0, len(items), self.max_batch):
                out += self.generate(
                    items[i : i + self.max_batch],
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens,
                    decode_text=decode_text,
                    on_progress=on_progress,
                )
            return out
        with self._lock:
            return self._on_gpu_thread(self._generate_inference, items, max_new_tokens, min_new_tokens, decode_text,
                                       on_progress=on_progress)

    def _generate_inference(self, *args, **kwargs) -> list[Generated]:
        with self.torch.inference_mode():
            return self._generate(*args, **kwargs)

    def _on_gpu_thread(self, fn, *args, **kwargs):
        """Run *fn* on the one thread that does all of this generator's GPU work.

        Warm-up and serving then share that thread's cuBLAS handle, workspaces and
        heuristics caches: the daemon warms up on its loader thread and serves from
        its inference thread, and the first batch on a new thread paid ~0.1 s more
        (the first request after READY at 1.4x the steady p50 on an H200).
        """
        if self._gpu_thread is None:
            return fn(*args, **kwargs)
        return self._gpu_thread.submit(fn, *args, **kwargs).result()

    def _generate(self, items, max_new_tokens, min_new_tokens, decode_text, length=None,
                  on_progress=None) -> list[Generated]:
        torch = self.torch
        t0 = time.perf_counter()
        n = len(items)
        max_new = int(max_new_tokens or self.max_new_tokens)
        min_new = max(0, min(int(min_new_tokens), max_new))
        B = self.bucket_for(n)
        P = max(it.prompt_len for it in items)
        need = max(P + max_new, length or 0)
        if need > self.max_cache_len:
            # Longer than the static cache: the plain (uncaptured) HF path, correct but slower.
            logger.warning("prompt %d + %d new tokens exceeds cache %d: eager fallback", P, max_new, self.max_cache_len)
            return self._generate_eager(items, max_new, min_new, decode_text, t0)
        L = _round_up(need, LENGTH_BUCKET)
        # Capture first: capturing runs the step on scratch state, which must not clobber this batch's.
        graph = self._graph_for(B, L)

        batch = self._collate(items)
        # ---- prefill (HF forward: vision tower, deepstack, exact 3-D positions)
        out = self.model(**batch, use_cache=True, logits_to_keep=1)
        cache = out.get("cache") if "cache" in out else out.get("past_key_values")  # 5.2x: cache; 5.1x: pkv
        for li in range(len(self.layers)):
            lk, lv = _layer_kv(cache, li)
            self.k_cache[li][:n, :, :P].copy_(lk)
            self.v_cache[li][:n, :, :P].copy_(lv)
        # ---- per-row decode state
        self.attend[:B] = False
        self.attend[:n, :P] = batch["attention_mask"].bool()
        if B > n:
            self.attend[n:B, 0] = True  # inert filler rows see one slot (no all-masked softmax)
        spans = torch.tensor([it.rope_span for it in items], dtype=torch.long)
        self.delta[:B] = 0
        self.delta[:n] = (spans - P).to(self.device)
        self.finished[:B] = False
        if B > n:
            self.finished[n:B] = True
        self.min_new.fill_(min_new)
        self.step.fill_(0)
        self.idx.fill_(P)
        self.tok[:B] = self.pad_id
        first = out.logits[:, -1].float()
        del out, cache
        if B > n:
            first = torch.cat([first, first.new_zeros((B - n, first.shape[-1]))])
        self._select(first, B)  # token 0 from the prefill logits
        t_prefill = time.perf_counter()

        # ---- decode: one captured step per token
        steps = 1
        stop = on_progress is not None and on_progress(steps)
        while steps < max_new and not stop:
            if graph is not None:
                graph.graph.replay()
            else:
                self._step_fn(B, L)
            steps += 1
            if steps % CHECK_EVERY == 0:
                if bool(self.finished[:n].all()):
                    break
                stop = on_progress is not None and on_progress(steps)
        tokens = self.out[:n, :steps].tolist()
        t_end = time.perf_counter()
        return self._results(items, tokens, B, decode_text, t0, t_prefill, t_end, steps)

    def _results(self, items, tokens, B, decode_text, t0, t_prefill, t_end, steps) -> list[Generated]:
        eos = set(self.eos_ids)
        results = []
        for it, row in zip(items, tokens):
            ids = []
            for t in row:
                ids.append(int(t))
                if t in eos:
                    break
            text = self.decode(ids) if decode_text else ""
            results.append(
                Generated(
                    token_ids=ids,
                    text=text,
                    prompt_tokens=it.prompt_len,
                    batch_size=B,
                    generate_ms=(t_end - t0) * 1000.0,
                    stats={"prefill_ms": (t_prefill - t0) * 1000.0, "decode_steps": steps},
                )
            )
        return results

    def decode(self, ids: Sequence[int]) -> str:
        tok = self.processor.tokenizer
        known = len(tok)
        # Ids beyond the tokenizer (possible with random weights) carry no text.
        return tok.decode([i for i in ids if i < known], skip_special_tokens=True).strip()

    def _generate_eager(self, items, max_new, min_new, decode_text, t0) -> list[Generated]:
        """The uncaptured path: HF ``generate`` on the merged model (same greedy tokens)."""
        batch = self._collate(items)
        P = batch["input_ids"].shape[1]
        seqs = self.model.generate(
            **batch,
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        t_end = time.perf_counter()
        tokens = seqs[:, P:].tolist()
        return self._results(items, tokens, len(items), decode_text, t0, t0, t_end, len(tokens[0]))

    # ------------------------------------------------------------------ warmup
    def warmup(self, image, *, max_new_tokens: int | None = None, lengths: Sequence[int] = ()) -> dict:
        """Run every batch bucket once (prefill shapes, cuBLAS heuristics) and capture its decode graph.

        *image* is a representative input (a text-line image); its prompt length
        plus ``max_new_tokens`` fixes the cache-length bucket captured for each
        batch size, plus any extra total *lengths* given. Returns timings.
        """
        prep = self.prepare(image)
        with self._lock:
            return self._on_gpu_thread(self._warmup, prep, max_new_tokens, lengths)

    def _warmup(self, prep: Prepared, max_new_tokens: int | None, lengths: Sequence[int]) -> dict:
        t0 = time.perf_counter()
        max_new = int(max_new_tokens or self.max_new_tokens)
        report = {}
        for b in self.batch_sizes:
            tb = time.perf_counter()
            # A short generate warms the prefill shapes; its decode graph is captured for the full length.
            with self.torch.inference_mode():
                self._generate([prep] * b, min(max_new, 4), 0, False, length=prep.prompt_len + max_new)
            for total in sorted(set(lengths)):
                L = _round_up(min(total, self.max_cache_len), LENGTH_BUCKET)
                with self.torch.inference_mode():
                    self._graph_for(b, L)
            report[b] = round((time.perf_counter() - tb) * 1000.0, 1)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        logger.info("fast path warm: batch sizes %s in %.1f s", self.batch_sizes, time.perf_counter() - t0)
        return {"warmup_s": time.perf_counter() - t0, "per_batch_ms": report, "prompt_tokens": prep.prompt_len}


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


def _vision_attention_forward(mod, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """Qwen3-VL vision attention (HF's non-flash path) with equal-length images batched."""
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    n_tok = hidden_states.shape[0]
    heads = mod.num_heads
    q, k, v = mod.qkv(hidden_states).reshape(n_tok, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # (n_tok, heads, d)
    d = q.shape[-1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outs = []
    start = i = 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        cnt, length = j - i, lengths[i]
        sl = slice(start, start + cnt * length)
        qq, kk, vv = (t[sl].reshape(cnt, length, heads, d).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, scale=mod.scaling)
        outs.append(o.transpose(1, 2).reshape(cnt * length, heads * d))
        start += cnt * length
        i = j
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return mod.proj(out)


# Below this many prompt tokens in a prefill, the eager ops win: the compiled ones' guard checks
# cost more CPU time than their fusion saves GPU time (a batch-1 prefill is launch-bound).
COMPILED_PREFILL_MIN_TOKENS = 2048


def _norm_forward(fn, mod, x):
    if x.dim() >= 3 and x.shape[0] * x.shape[1] >= COMPILED_PREFILL_MIN_TOKENS:
        return fn(x, mod.weight, mod.variance_epsilon)
    return _rms(x, mod.weight, mod.variance_epsilon)


def _mlp_forward(fn, gu_weight, down_proj, x):
    import torch

    gu = torch.nn.functional.linear(x, gu_weight)
    if x.dim() >= 3 and x.shape[0] * x.shape[1] >= COMPILED_PREFILL_MIN_TOKENS:
        return down_proj(fn(gu))
    return down_proj(_silu_mul(gu))


class _Ops:
    """The decode step's elementwise pieces: plain PyTorch, or each compiled by inductor (fused kernels).

    Compiled per function with dynamic batch size, so a handful of small graphs
    serve every layer and every batch bucket; their kernels land in the
    persistent compile cache (:func:`configure_compile_cache`).
    """

    def __init__(self, torch, *, compile: bool) -> None:
        fns = {"rms": _rms, "add_rms": _add_rms, "qk": _qk, "silu_mul": _silu_mul}
        for name, fn in fns.items():
            setattr(self, name, torch.compile(fn, dynamic=None, fullgraph=True) if compile else fn)


def _layer_kv(cache, li: int):
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[li].keys, layers[li].values
    return cache[li][0], cache[li][1]  # legacy tuple format


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
