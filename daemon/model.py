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
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from htrctl.errors import GpuError, ModelError
from htrctl.modeldir import variant_paths

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


def load_model(model_dir: str | os.PathLike, *, device: str, dtype: str = "auto", variant: str = "auto",
               merge: bool = True, progress: Callable[[str], None] = lambda s: None) -> Loaded:
    """Load processor and model onto *device*; raises ModelError/ModelMissingError/GpuError."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    model_dir = Path(model_dir)
    used, weights, adapter = variant_paths(model_dir, variant)  # a missing variant fails before the slow imports
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        from htrctl.errors import ModelMissingError

        raise ModelMissingError(f"{adapter}/adapter_config.json does not exist (the LoRA adapter)",
                                remedy="provision the complete model directory with `htrctl provision`")
    progress("importing torch and transformers")
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    transformers.utils.logging.disable_progress_bar()
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
    progress(f"loading processor from {model_dir}")
    try:
        processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the processor/tokenizer from {model_dir}: {_first_line(exc)}",
                         remedy="run `htrctl verify` and re-provision the directory") from exc
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

        try:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"cannot load the LoRA adapter from {adapter}: {_first_line(exc)}",
                             remedy="run `htrctl verify`; the adapter must match the base model") from exc
        if merge:
            t0 = time.perf_counter()
            model = model.merge_and_unload()
            logger.info("LoRA merged into the weights in %.2f s", time.perf_counter() - t0)
    if str(device) == "cpu":
        model = model.to("cpu")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    assert_one_device(model, device)
    return Loaded(model=model, processor=processor, variant=used, dtype_name=dtype_name, device=str(device))


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

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[0])


class Preprocessor:
    """The prompt and the image preprocessing for one model. Thread-safe.

    The image processor (resize, normalise, patchify) runs per image; the
    prompt's token ids depend only on the image's patch grid, so they are
    computed once per grid shape with the full processor (chat text with the
    image placeholder expanded, tokenised) and reused.
    """

    def __init__(self, processor, model, *, prompt: str = DEFAULT_PROMPT, one_cpu_thread: bool = False) -> None:
        import torch

        self.torch = torch
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt
        self.dtype = next(model.parameters()).dtype
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self.eos_ids, self.pad_id = special_ids(model, self.tokenizer)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.chat_text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self._one_cpu_thread = one_cpu_thread
        self._tls = threading.local()
        self._lock = threading.Lock()  # the tokenizer (grid-cache misses only)
        self._ids: dict[tuple[int, ...], tuple[Any, Any, int]] = {}
        self.hits = 0
        self.misses = 0

    def prepare(self, image) -> Prepared:
        """Preprocess one PIL image (CPU only; safe from any thread)."""
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
        input_ids, mm, span = cached
        return Prepared(input_ids=input_ids, mm_token_type_ids=mm,
                        pixel_values=px["pixel_values"].to(self.dtype),  # the vision tower casts to it anyway
                        image_grid_thw=grid, rope_span=span, preprocess_ms=(time.perf_counter() - t0) * 1000.0)

    def encode_full(self, image) -> dict[str, Any]:
        """The processor's own encoding of *image* with the prompt (the reference :meth:`prepare` matches)."""
        with self._lock:
            return dict(self.processor(text=[self.chat_text], images=[image.convert("RGB")], return_tensors="pt"))

    def _tokenise(self, image, key: tuple[int, ...]):
        enc = self.encode_full(image)
        input_ids = enc["input_ids"][0]
        mm = enc.get("mm_token_type_ids")
        mm = None if mm is None else mm[0]
        n_img = int((input_ids == self.image_token_id).sum())
        _, h, w = key[:3]
        span = int(input_ids.shape[0]) - n_img + max(h, w) // self.merge
        value = (input_ids, mm, span)
        with self._lock:
            self.misses += 1
            if len(self._ids) >= PROMPT_CACHE_SIZE:
                self._ids.clear()
            self._ids[key] = value
        return value

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
