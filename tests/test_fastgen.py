"""The fast generation path (htrd.fastgen) gives the naive path's greedy tokens, on the real demo model.

Naive = what the incident's fix did: base ``from_pretrained`` + ``PeftModel.from_pretrained``
(adapter NOT merged) + ``generate``, one image at a time. Fast = merged weights, static KV cache,
bucketed batches with left padding, the hand-written decode step (uncaptured on the CPU).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from PIL import Image, ImageDraw  # noqa: E402

PROMPT = "Transcribe the handwritten text in this image exactly. Output only the text."
NEW = 24


def _line(w: int, h: int, seed: int) -> Image.Image:
    import random

    rnd = random.Random(seed)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        draw.line([(rnd.randrange(w), rnd.randrange(h)), (rnd.randrange(w), rnd.randrange(h))],
                  fill=(rnd.randrange(200),) * 3, width=3)
    return img


IMAGES = [_line(1200, 160, 1), _line(600, 100, 2), _line(900, 130, 3)]  # different prompt lengths


def _naive_model(model_dir):
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    base = Qwen3VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True, use_safetensors=True
    )
    model = PeftModel.from_pretrained(base, model_dir / "final_model", local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(model_dir, local_files_only=True)


def _naive_tokens(model, processor, image, *, new=NEW, min_new=0, eos=None) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    kw = {} if eos is None else {"eos_token_id": eos}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new, min_new_tokens=min_new, do_sample=False, **kw)
    return out[0, enc["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def naive(demo_model_dir):
    model, processor = _naive_model(demo_model_dir)
    return {
        "model": model,
        "processor": processor,
        "tokens": [_naive_tokens(model, processor, im) for im in IMAGES],
    }


@pytest.fixture(scope="module")
def fast(demo_model_dir):
    from htrd.fastgen import FastGenerator

    return FastGenerator.load(
        demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512, max_new_tokens=NEW
    )


def test_batched_fast_path_equals_naive_one_at_a_time(naive, fast):
    assert fast.variant == "adapter"  # merged at load from final_model/
    preps = [fast.prepare(im) for im in IMAGES]
    assert len({p.prompt_len for p in preps}) > 1, "the images must give different prompt lengths (left padding)"
    out = fast.generate(preps)  # 3 images -> bucket 4 with one inert row
    assert [o.batch_size for o in out] == [4, 4, 4]
    for got, want in zip(out, naive["tokens"]):
        assert got.token_ids == want[: len(got.token_ids)]
        assert len(got.token_ids) == len(want)
        assert got.prompt_tokens > 0


def test_equal_sized_images_batched_through_the_vision_tower(naive, fast):
    """Consecutive same-size images share one vision attention call; results stay per image."""
    preps = [fast.prepare(IMAGES[0]), fast.prepare(IMAGES[0]), fast.prepare(IMAGES[1]), fast.prepare(IMAGES[1])]
    out = fast.generate(preps)
    assert [o.token_ids for o in out] == [naive["tokens"][0]] * 2 + [naive["tokens"][1]] * 2


def test_single_requests_equal_naive(naive, fast):
    for im, want in zip(IMAGES, naive["tokens"]):
        (got,) = fast.generate([fast.prepare(im)])
        assert got.token_ids == want
        assert got.batch_size == 1


def test_eos_stops_a_row_and_min_new_tokens_suppresses_it(naive, demo_model_dir):
    """Make a token the model emits at step 3 the EOS: both paths stop there, or not before min_new_tokens."""
    from htrd.fastgen import FastGenerator, load_merged_model

    target = naive["tokens"][0][3]
    assert target not in naive["tokens"][0][:3]
    model, _ = load_merged_model(demo_model_dir, device="cpu", dtype=torch.float32)
    model.generation_config.eos_token_id = [target]
    gen = FastGenerator(model, naive["processor"], prompt=PROMPT, batch_sizes=[1, 2], max_cache_len=256,
                        max_new_tokens=NEW)
    assert gen.eos_ids == [target]
    preps = [gen.prepare(IMAGES[0]), gen.prepare(IMAGES[1])]
    stopped, other = gen.generate(preps)
    assert stopped.token_ids == naive["tokens"][0][:4]  # through the EOS, like generate's output
    want_other = _naive_tokens(naive["model"], naive["processor"], IMAGES[1], eos=[target])
    assert other.token_ids == want_other[: len(other.token_ids)]
    forced = gen.generate(preps[:1], min_new_tokens=10)[0]
    want = _naive_tokens(naive["model"], naive["processor"], IMAGES[0], min_new=10, eos=[target])
    assert target not in forced.token_ids[:10]
    assert forced.token_ids == want[: len(forced.token_ids)]


def test_prompt_longer_than_the_static_cache_uses_the_eager_path(naive, demo_model_dir):
    from htrd.fastgen import FastGenerator

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2], max_cache_len=64,
                             max_new_tokens=NEW)
    prep = gen.prepare(IMAGES[0])
    assert prep.prompt_len + NEW > gen.max_cache_len
    (got,) = gen.generate([prep])
    assert got.token_ids == naive["tokens"][0]


def test_more_images_than_the_largest_bucket_are_split(naive, fast):
    preps = [fast.prepare(IMAGES[i % 3]) for i in range(6)]  # largest bucket is 4
    out = fast.generate(preps)
    assert [o.token_ids for o in out] == [naive["tokens"][i % 3] for i in range(6)]


def test_warmup_runs_every_bucket(fast):
    report = fast.warmup(IMAGES[0], max_new_tokens=8)
    assert set(report["per_batch_ms"]) == {1, 2, 4}
    assert report["prompt_tokens"] == fast.prepare(IMAGES[0]).prompt_len


def test_merged_variant_is_preferred_and_gives_the_same_tokens(naive, demo_model_copy):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    from htrd.fastgen import FastGenerator, resolve_variant

    assert resolve_variant(demo_model_copy) == "adapter"
    base = Qwen3VLForConditionalGeneration.from_pretrained(demo_model_copy, dtype=torch.float32, local_files_only=True)
    merged = PeftModel.from_pretrained(base, demo_model_copy / "final_model").merge_and_unload()
    merged.save_pretrained(demo_model_copy / "merged", safe_serialization=True)
    assert resolve_variant(demo_model_copy) == "merged"
    assert resolve_variant(demo_model_copy, "adapter") == "adapter"
    gen = FastGenerator.load(demo_model_copy, device="cpu", prompt=PROMPT, batch_sizes=[1], max_cache_len=256,
                             max_new_tokens=NEW)
    assert gen.variant == "merged"
    (got,) = gen.generate([gen.prepare(IMAGES[2])])
    assert got.token_ids == naive["tokens"][2]


def test_variant_merged_without_merged_dir_is_a_named_error(demo_model_dir):
    from htrctl.errors import ModelMissingError
    from htrd.fastgen import resolve_variant

    with pytest.raises(ModelMissingError, match="provision --merge"):
        resolve_variant(demo_model_dir, "merged")


def test_compile_cache_dir_is_created_and_exported(tmp_path, monkeypatch):
    from htrd.fastgen import configure_compile_cache

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(var, "x")  # recorded, so the fixture restores the original afterwards
        monkeypatch.delenv(var)
    root = configure_compile_cache(tmp_path / "cc")
    assert root == tmp_path / "cc"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cc" / "triton")
    assert (tmp_path / "cc" / "triton").is_dir()
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")  # an operator's setting wins
    configure_compile_cache(tmp_path / "cc2")
    assert os.environ["TRITON_CACHE_DIR"] == "/elsewhere"


def test_generation_runs_on_one_dedicated_thread(naive, fast):
    """On CUDA every generate and the warm-up run on one 'htrd-gpu' thread (shared cuBLAS state);
    exercised here on the CPU by giving the generator that thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    seen = []
    fast._gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="htrd-gpu")
    try:
        fast.warmup(IMAGES[1], max_new_tokens=8)
        out = fast.generate([fast.prepare(IMAGES[1])],
                            on_progress=lambda n: seen.append(threading.current_thread().name) and False)
    finally:
        fast._gpu_thread.shutdown()
        fast._gpu_thread = None
    assert out[0].token_ids == naive["tokens"][1]
    assert seen and all(name.startswith("htrd-gpu") for name in seen)
