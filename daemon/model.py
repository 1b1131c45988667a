"""The model: the one loader, the processor, the prompt, EOS/pad ids and preprocessing.

Everything that loads or feeds the Qwen3-VL model goes through here -- htrd's
engine, ``htrctl provision --merge`` (:mod:`htrctl.merge`), the tests and the
benchmarks -- so what is tested is what runs:

- :func:`load_model`: offline (``HF_HUB_OFFLINE=1``), ``local_files_only``,
  safetensors only, no remote code, one explicit device (never
  ``device_map="auto"``), SDPA attention. The variant comes from
  :func:`htrctl.modeldir.resolve_variant`: ``merged/`` when present, else the
  base plus ``final_model/`` through PEFT, folded into the weights with
  ``merge_and_unload`` unless ``merge=False``. Every parameter and buffer is
  asserted to sit on the device.
  An adapter is checked first by :func:`htrctl.verify.inspect_adapter` (headers
  only; its errors are the loader's, so ``htrctl verify`` ok <=> this loads) and
  loaded as it was trained: when its ``embed_tokens``/``lm_head`` were resized
  (added tokens), the base's embeddings are resized to the saved rows before
  ``PeftModel.from_pretrained``; ``modules_to_save`` load with it.
- The processor: the adapter's own files when ``final_model/`` has them (what
  training used; a tokenizer alone is paired with the base's image processor),
  else the base's -- :func:`htrctl.modeldir.processor_source`.
- :class:`Preprocessor`: the chat prompt (rendered once), image preprocessing,
  and the prompt's token ids -- tokenised once per image-grid shape and cached,
  since every line of the same patch grid has the same ids. Thread-safe.
- :func:`special_ids`: EOS and pad ids, from the generation config.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from htrctl.errors import GpuError, IncompatibleAdapterError, ModelCorruptError, ModelError, ModelMissingError
from htrctl.modeldir import CHAT_TEMPLATE_FILES, processor_source, variant_paths

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Transcribe the handwritten text in this image exactly. Output only the text."
PROMPT_CACHE_SIZE = 4096  # distinct image grids remembered (lines of one collection share a few dozen)


def resolve_dtype_name(setting: str, device: str) -> str:
    """``auto``: float32 on the CPU, bfloat16 on a GPU."""
    if setting == "auto":
        return "float32" if str(device) == "cpu" else "bfloat16"
    return setting


@dataclass
class Loaded:
    model: Any  # a Qwen3-VL ForConditionalGeneration (merged), or a PeftModel when merge=False
    processor: Any
    variant: str  # "merged" (merged/) | "adapter" (base + final_model/, folded in at load when merge=True)
    dtype_name: str
    device: str
    processor_from: str = "base"  # "base" | "adapter" | "adapter-tokenizer" (htrctl.modeldir.processor_source)
    vocab_resized: int | None = None  # rows the base's embeddings were resized to for the adapter


def load_model(model_dir: str | os.PathLike, *, device: str, dtype: str = "auto", variant: str = "auto",
               merge: bool = True, progress: Callable[[str], None] = lambda s: None,
               imported: Callable[[], None] = lambda: None) -> Loaded:
    """Load processor and model onto *device*; raises ModelError/ModelMissingError/GpuError. *imported()* runs
    once torch and transformers are imported, before the weights load (htrd starts compiling beside them)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    model_dir = Path(model_dir)
    used, weights, adapter = variant_paths(model_dir, variant)  # a missing variant fails before the slow imports
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise ModelMissingError(f"{adapter}/adapter_config.json does not exist (the LoRA adapter)",
                                remedy="provision the complete model directory with `htrctl provision`")
    plan = _adapter_plan(model_dir, adapter) if adapter is not None else None  # headers only, before the imports
    progress("importing torch and transformers")
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText

    transformers.utils.logging.disable_progress_bar()
    imported()
    dtype_name = resolve_dtype_name(dtype, device)
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise GpuError(
                f"torch cannot use the GPU pinned with CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}",
                remedy="check the NVIDIA driver and that torch is a CUDA build (htrctl doctor); or set gpu.select: cpu",
            )
        dev = torch.device(device)
        if dev.index is None:
            device = f"cuda:{torch.cuda.current_device()}"  # one explicit device, also for "cuda"
        torch.cuda.set_device(torch.device(device))
    processor_from, processor_dir = processor_source(model_dir)
    progress(f"loading processor from {processor_dir}")
    processor = load_processor(model_dir)
    progress(f"loading {used} weights from {weights} ({dtype_name}, {device})")
    kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True, dtype=getattr(torch, dtype_name),
                                  attn_implementation="sdpa")
    if str(device) != "cpu":
        kwargs["device_map"] = {"": str(device)}  # one explicit device, weights loaded straight onto it
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(weights), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the model weights from {weights}: {_first_line(exc)}",
                         remedy="run `htrctl verify` and re-provision the directory") from exc
    if adapter is not None:
        progress(f"applying the LoRA adapter from {adapter}")
        from peft import PeftModel

        if plan is not None and plan.vocab is not None:
            # as training did (resize_token_embeddings after adding tokens); the rows it trained come with the
            # adapter (modules_to_save), a shrunk vocabulary is a plain cut. No mean-resizing: nothing random.
            progress(f"resizing the embeddings from {plan.base_vocab} to the adapter's {plan.vocab} rows")
            model.resize_token_embeddings(plan.vocab, mean_resizing=False)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"cannot load the LoRA adapter from {adapter}: {_first_line(exc)}",
                             remedy="run `htrctl verify`; the adapter must match the base model") from exc
        for w in caught:
            if "missing adapter keys" in str(w.message):  # PEFT would serve those modules untrained
                raise IncompatibleAdapterError(
                    f"cannot load the LoRA adapter from {adapter}: {_first_line(w.message)}",
                    remedy="run `htrctl verify`; the adapter's weights do not cover what its config targets")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if merge:
            t0 = time.perf_counter()
            try:
                model = model.merge_and_unload()
            except (ValueError, NotImplementedError, RuntimeError, TypeError) as exc:
                raise IncompatibleAdapterError(
                    f"PEFT cannot merge the LoRA adapter from {adapter} into the weights: {_first_line(exc)}",
                    remedy="merge it where it was trained and provision the merged model, or train without "
                           "this option") from exc
            logger.info("LoRA merged into the weights in %.2f s", time.perf_counter() - t0)
    if str(device) == "cpu":
        model = model.to("cpu")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    assert_one_device(model, device)
    return Loaded(model=model, processor=processor, variant=used, dtype_name=dtype_name, device=str(device),
                  processor_from=processor_from, vocab_resized=plan.vocab if plan is not None else None)


def _adapter_plan(model_dir: Path, adapter: Path):
    """verify's adapter<->base check (headers and configs only); its errors refuse the load with verify's words."""
    from htrctl.verify import (
        HeaderError,
        inspect_adapter,
        load_weight_set,
        read_config,
        read_safetensors_header,
    )

    config = read_config(model_dir)
    ws, _ = load_weight_set(model_dir)
    if config is None or ws is None:
        raise ModelMissingError(f"{model_dir}: the base model's config.json or weights cannot be read",
                                remedy="run `htrctl verify` and re-provision the directory")
    for rel in ws.files:  # a truncated or corrupt shard hides its tensors: name it, not the adapter pair
        try:
            read_safetensors_header(model_dir / rel)
        except (HeaderError, OSError) as exc:
            raise ModelCorruptError(f"{model_dir / rel}: {exc}",
                                    remedy="run `htrctl verify` and re-provision the directory") from exc
    plan = inspect_adapter(config, ws, adapter)
    if plan.errors:
        first = plan.errors[0]
        raise IncompatibleAdapterError(f"cannot load the LoRA adapter: {first.path}: {first.problem}",
                                       remedy=first.remedy, detail=[f.to_dict() for f in plan.errors])
    return plan


def load_processor(model_dir: str | os.PathLike):
    """The processor htrd serves *model_dir* with (:func:`_load_processor`), offline; raises ModelError."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    model_dir = Path(model_dir)
    source, processor_dir = processor_source(model_dir)
    try:
        return _load_processor(model_dir, source, processor_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load the processor/tokenizer from {processor_dir}: {_first_line(exc)}",
                         remedy="run `htrctl verify` and re-provision the directory") from exc


def _load_processor(model_dir: Path, source: str, processor_dir: Path):
    """The processor htrd serves with: the adapter's whole processor, the base's image processor with the
    adapter's tokenizer (and chat template), or the base's."""
    from transformers import AutoProcessor, AutoTokenizer

    if source == "adapter":
        return AutoProcessor.from_pretrained(str(processor_dir), local_files_only=True)
    if source == "base":
        return AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(processor_dir), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True, tokenizer=tokenizer)
    template = _chat_template(processor_dir) or getattr(tokenizer, "chat_template", None)
    if template:
        processor.chat_template = template
    return processor


def _chat_template(d: Path) -> str | None:
    import json

    for name in CHAT_TEMPLATE_FILES:
        p = d / name
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


def assert_one_device(model, device: str) -> None:
    """Every parameter and buffer on *device*; a model split over devices is a GpuError."""
    import torch

    target = torch.device(device)
    devmap = getattr(model, "hf_device_map", None) or getattr(getattr(model, "base_model", None), "hf_device_map", None)
    if devmap and len(set(map(str, devmap.values()))) > 1:
        raise GpuError(f"the model was split over several devices: {sorted(set(map(str, devmap.values())))}",
                       remedy="the model must live on one GPU; this is a bug in htrd")
    stray = [(n, str(t.device)) for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.device != target]
    if stray:
        raise GpuError(f"{len(stray)} tensors are not on {device}, e.g. {stray[:3]}",
                       remedy="the model must live on one device; this is a bug in htrd")


def special_ids(model, tokenizer) -> tuple[list[int], int]:
    """``(eos_ids, pad_id)`` as greedy ``generate`` uses them: the generation config's, then the model's."""
    gen = getattr(model, "generation_config", None)
    tcfg = getattr(model.config, "text_config", model.config)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(tcfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = getattr(tcfg, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


@dataclass
class Prepared:
    """One image, preprocessed on the CPU, ready to be collated into a prefill."""

    input_ids: Any  # LongTensor (S,)
    mm_token_type_ids: Any | None  # IntTensor (S,) or None (older transformers)
    pixel_values: Any  # FloatTensor (patches, dim), in the model's dtype
    image_grid_thw: Any  # LongTensor (1, 3)
    rope_span: int  # max M-RoPE position + 1 over the prompt
    preprocess_ms: float = 0.0
    positions: Any = None  # LongTensor (3, S): the prompt's M-RoPE positions (temporal, height, width)
    image_positions: Any = None  # LongTensor (k,): where the image's k tokens are in input_ids

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Encoded:
    """One image through the processor alone (:class:`ImageEncoder`): what crosses from a preprocessing worker
    process to htrd (:mod:`htrd.prepool`); :meth:`Preprocessor.complete` makes it a :class:`Prepared`."""

    input_ids: Any  # LongTensor (S,): the prompt with the image's tokens
    mm_token_type_ids: Any | None  # IntTensor (S,) or None (older transformers)
    pixel_values: Any  # (patches, dim), in the model's dtype
    image_grid_thw: Any  # LongTensor (1, 3)
    preprocess_ms: float = 0.0

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.image_grid_thw.flatten().tolist())


class ImageEncoder:
    """The processor's part of preprocessing, which needs no model: the image processor (resize, normalise,
    patchify) per image, and the prompt's token ids -- which depend only on the image's patch grid, so they are
    computed once per grid with the full processor (chat text with the image placeholder expanded, tokenised)
    and reused. Thread-safe; runs in htrd's preprocessing worker processes (:mod:`htrd.prepool`) or threads."""

    def __init__(self, processor, *, prompt: str = DEFAULT_PROMPT, dtype=None, one_cpu_thread: bool = False) -> None:
        import torch

        self.torch = torch
        self.processor = processor
        self.prompt = prompt
        self.dtype = dtype or torch.float32
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.chat_text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self._one_cpu_thread = one_cpu_thread
        self._tls = threading.local()
        self._lock = threading.Lock()  # the tokenizer (grid-cache misses only)
        self._ids: dict[tuple[int, ...], tuple[Any, Any]] = {}
        self.hits = 0
        self.misses = 0

    def encode(self, image) -> Encoded:
        """One PIL image through the processor (CPU only; safe from any thread)."""
        t0 = time.perf_counter()
        self._limit_threads()
        image = image.convert("RGB")
        px = self.processor.image_processor(images=[image], return_tensors="pt")
        grid = px["image_grid_thw"]
        key = tuple(int(x) for x in grid.flatten().tolist())
        cached = self._ids.get(key)
        if cached is None:
            cached = self._tokenise(image, key)
        else:
            self.hits += 1
        input_ids, mm = cached
        pixels = px["pixel_values"].to(self.dtype)  # the vision tower casts to it anyway
        return Encoded(input_ids=input_ids, mm_token_type_ids=mm, pixel_values=pixels, image_grid_thw=grid,
                       preprocess_ms=(time.perf_counter() - t0) * 1000.0)

    def encode_full(self, image) -> dict[str, Any]:
        """The processor's own encoding of *image* with the prompt (the reference :meth:`encode` matches)."""
        with self._lock:
            return dict(self.processor(text=[self.chat_text], images=[image.convert("RGB")], return_tensors="pt"))

    def _tokenise(self, image, key: tuple[int, ...]):
        enc = self.encode_full(image)
        mm = enc.get("mm_token_type_ids")
        value = (enc["input_ids"][0], None if mm is None else mm[0])
        with self._lock:
            self.misses += 1
            if len(self._ids) >= PROMPT_CACHE_SIZE:
                self._ids.clear()
            self._ids[key] = value
        return value

    def _limit_threads(self) -> None:
        """On a GPU host, each preprocessing thread's torch CPU ops run on one core.

        The image processor's tensor ops parallelise over every core by default;
        with many requests preprocessed at once that oversubscribes the CPU. The
        requests themselves are the parallelism. Not on a CPU-only host, where
        the model needs the cores.
        """
        if not self._one_cpu_thread or getattr(self._tls, "one_thread", False):
            return
        self.torch.set_num_threads(1)
        self._tls.one_thread = True


class Preprocessor:
    """The prompt and the image preprocessing for one model. Thread-safe.

    :class:`ImageEncoder` does the processor's part (:attr:`encoder`; in htrd, in worker processes);
    :meth:`complete` adds what depends on the model: the prompt's M-RoPE positions (once per grid, from HF's
    own ``get_rope_index``), where the image tokens sit, and on a GPU the patches in pinned memory.
    """

    def __init__(self, processor, model, *, prompt: str = DEFAULT_PROMPT, one_cpu_thread: bool = False) -> None:
        import torch

        self.torch = torch
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt
        self.dtype = next(model.parameters()).dtype
        self.encoder = ImageEncoder(processor, prompt=prompt, dtype=self.dtype, one_cpu_thread=one_cpu_thread)
        # Patches in pinned memory when the model is on a GPU: the prefill's copy is then queued on the stream
        # (see to_device), and the pinning's memcpy runs off the inference thread.
        self._pin = next(model.parameters()).device.type == "cuda"
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        inner = model  # the multimodal model under ForConditionalGeneration (and PEFT's wrappers)
        while not hasattr(inner, "get_rope_index") and hasattr(inner, "model"):
            inner = inner.model
        self._rope_index = inner.get_rope_index  # HF's own M-RoPE positions; pure index math
        self.eos_ids, self.pad_id = special_ids(model, self.tokenizer)
        self.chat_text = self.encoder.chat_text
        self._lock = threading.Lock()
        self._positions_by_grid: dict[tuple[int, ...], tuple[int, Any, Any]] = {}

    def prepare(self, image) -> Prepared:
        """Preprocess one PIL image (CPU only; safe from any thread)."""
        return self.complete(self.encoder.encode(image))

    def complete(self, enc: Encoded) -> Prepared:
        """*enc* with the model's part: M-RoPE positions and image-token places (cached per grid), pinned
        patches on a GPU."""
        t0 = time.perf_counter()
        key = enc.grid
        cached = self._positions_by_grid.get(key)
        if cached is None:
            positions = self._positions(enc.input_ids, enc.mm_token_type_ids, key)
            image_positions = (enc.input_ids == self.image_token_id).nonzero().squeeze(1)
            cached = (int(positions.max()) + 1, positions, image_positions)
            with self._lock:
                if len(self._positions_by_grid) >= PROMPT_CACHE_SIZE:
                    self._positions_by_grid.clear()
                self._positions_by_grid[key] = cached
        span, positions, image_positions = cached
        pixels = pinned(enc.pixel_values) if self._pin else enc.pixel_values
        ms = enc.preprocess_ms + (time.perf_counter() - t0) * 1000.0
        return Prepared(input_ids=enc.input_ids, mm_token_type_ids=enc.mm_token_type_ids, pixel_values=pixels,
                        image_grid_thw=enc.image_grid_thw, rope_span=span, preprocess_ms=ms,
                        positions=positions, image_positions=image_positions)

    def encode_full(self, image) -> dict[str, Any]:
        """The processor's own encoding of *image* with the prompt (the reference :meth:`prepare` matches)."""
        return self.encoder.encode_full(image)

    def _positions(self, input_ids, mm, key: tuple[int, ...]):
        """The prompt's M-RoPE positions (3, S), from HF's own get_rope_index, on the CPU, once per grid."""
        torch = self.torch
        grid = torch.tensor([key[:3]], dtype=torch.long)
        ids = input_ids[None]
        try:  # transformers >= 5.2x: token types say where the image is
            pos, _ = self._rope_index(input_ids=ids, mm_token_type_ids=None if mm is None else mm[None],
                                      image_grid_thw=grid)
        except TypeError:  # earlier 5.x: found from the image token id
            pos, _ = self._rope_index(input_ids=ids, image_grid_thw=grid)
        return pos[:, 0].clone()

    def decode(self, ids) -> str:
        """Text of generated ids (EOS and ids beyond the tokenizer -- random weights -- carry none)."""
        known = len(self.tokenizer)
        eos = set(self.eos_ids)
        out = []
        for i in ids:
            if i in eos:
                break
            if i < known:
                out.append(int(i))
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()


def collate(items, *, pad_id: int, device, dtype, width: int | None = None) -> dict[str, Any]:
    """One prefill batch from prepared images: token tensors left-padded to the longest prompt (or to
    *width*, if longer; pad id, attention 0), the images' patches and grids concatenated; everything on
    *device*, patches in *dtype*."""
    import torch

    P = max([it.prompt_len for it in items] + [width or 0])
    B = len(items)
    tokens = torch.zeros((2, B, P), dtype=torch.long)  # ids and attention mask: one copy to the device
    ids, att = tokens[0].fill_(pad_id), tokens[1]
    has_mm = items[0].mm_token_type_ids is not None
    mm = torch.zeros((B, P), dtype=items[0].mm_token_type_ids.dtype) if has_mm else None
    for i, it in enumerate(items):
        n = it.prompt_len
        ids[i, P - n :] = it.input_ids
        att[i, P - n :] = 1
        if has_mm:
            mm[i, P - n :] = it.mm_token_type_ids
    tokens = to_device(tokens, device)
    batch = {"input_ids": tokens[0], "attention_mask": tokens[1], **image_batch(items, device=device, dtype=dtype)}
    if has_mm:
        batch["mm_token_type_ids"] = to_device(mm, device)
    return batch


def image_batch(items, *, device, dtype) -> dict[str, Any]:
    """The images of *items* for the vision tower: their patches concatenated (``pixel_values``, in *dtype*)
    and their grids (``image_grid_thw``), on *device* -- all a packed prefill takes besides its own token
    tensors (:meth:`htrd.fastgen.FastGenerator._packed_last`)."""
    import torch

    # Per-item copies concatenated on the device: no large CPU-side cat of the patches.
    return {"pixel_values": torch.cat([to_device(it.pixel_values, device).to(dtype) for it in items]),
            "image_grid_thw": to_device(torch.cat([it.image_grid_thw for it in items]), device)}


def has_flash_varlen(t) -> bool:
    """Whether flash attention's variable-length kernel (``aten._flash_attention_forward`` with cumulative
    sequence offsets) can run on *t*'s device and dtype: a GPU of compute capability 8.0 or newer (A100, L4,
    H100...), half precision, a torch that has it. Callers keep a fallback for everywhere else."""
    import torch

    return (t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(t.device)[0] >= 8
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


def to_device(t, device):
    """The CPU tensor *t* on *device*; on a GPU without waiting for it. A copy from pageable memory waits for
    the kernels queued before it (the driver stages it, and its staging buffers free only as queued copies
    run): in a prefill launched behind decode steps, for those steps -- on an H200 under 64 clients, 24-30 %
    of the inference thread's time, the GPU idle meanwhile. From pinned memory the copy is queued on the
    stream; torch's caching host allocator keeps a pinned block until the copies reading it have run."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return pinned(t).to(device, non_blocking=True)


_pin_failed = threading.Event()


def pinned(t):
    """The CPU tensor *t* in pinned (page-locked) memory; *t* itself where pinning fails (e.g. the host cannot
    lock more memory): its copies to the GPU then wait for queued work -- slower, the same results. Logged
    once."""
    if t.is_pinned():
        return t
    try:
        return t.pin_memory()
    except RuntimeError as exc:
        if not _pin_failed.is_set():
            _pin_failed.set()
            logger.warning("cannot pin host memory (%s): copies to the GPU go through pageable memory, slower "
                           "under load", _first_line(exc))
        return t


@dataclass
class PromptLayout:
    """What a prefill needs beyond the collated tensors, built on the host so that the forward never waits
    for the GPU to learn it: M-RoPE positions, where the image tokens sit, each image's patch count."""

    position_ids: Any  # LongTensor (3, B, P) on the device; 0 at left padding
    image_index: Any  # LongTensor (k,) on the device: flat (B * P) positions of every image token, in order
    vision_lengths: list[int]  # patches per image (frame), in order: the vision tower's attention blocks
    grids: list[tuple[int, int, int]]  # (t, h, w) patch grid per image, in order


def prompt_layout(items, *, device, width: int | None = None) -> PromptLayout:
    """The :class:`PromptLayout` of :func:`collate`'s left-padded batch of *items* (the same *width*)."""
    import torch

    P = max([it.prompt_len for it in items] + [width or 0])
    pos = torch.zeros((3, len(items), P), dtype=torch.long)
    index = []
    for i, it in enumerate(items):
        off = P - it.prompt_len
        pos[:, i, off:] = it.positions
        index.append(it.image_positions + (i * P + off))
    lengths, grids = image_grids(items)
    return PromptLayout(position_ids=to_device(pos, device), image_index=to_device(torch.cat(index), device),
                        vision_lengths=lengths, grids=grids)


def image_grids(items) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The images of *items*, in order: patches per frame (the vision tower's attention blocks) and the
    (t, h, w) patch grid of each image."""
    lengths, grids = [], []
    for it in items:
        for t, h, w in it.image_grid_thw.tolist():
            lengths += [h * w] * t
            grids.append((t, h, w))
    return lengths, grids


def warmup_image():
    """A synthetic 1200x160 text-line image (dark strokes on white): warm-up and benchmarks."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (1200, 160), "white")
    draw = ImageDraw.Draw(img)
    for x in range(40, 1160, 60):
        draw.line([(x, 120), (x + 30, 40)], fill="black", width=5)
    return img


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
