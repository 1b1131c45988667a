"""The fast generator (htrd.fastgen) gives the naive path's greedy tokens, on the real demo model in fp32.

Naive = what the incident's fix did: base ``from_pretrained`` + ``PeftModel.from_pretrained``
(adapter NOT merged) + ``generate``, one image at a time. Fast = merged weights, a static KV cache
with slots, lines prefilled together with left padding or joining a running batch midway, the
hand-written decode step (uncaptured on the CPU).
"""

from __future__ import annotations

import itertools
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import stroke_line  # noqa: E402

PROMPT = "Transcribe the handwritten text in this image exactly. Output only the text."
NEW = 24


IMAGES = [stroke_line(1200, 160, 1), stroke_line(600, 100, 2), stroke_line(900, 130, 3)]  # different prompt lengths


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


@pytest.fixture(scope="module")
def mixed(demo_model_dir):
    """The fast generator with mixed steps (prompts prefilled in chunks inside the decode steps)."""
    from htrd.fastgen import FastGenerator

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512,
                             max_new_tokens=NEW, mixed=True)
    assert gen.mixed
    return gen


# The tests of what a caller sees run on both ways of prefilling: between the decode steps (packed) and inside
# them (mixed steps).
BOTH = pytest.mark.parametrize("gen_name", ["fast", "mixed"])


@BOTH
def test_batched_fast_path_equals_naive_one_at_a_time(naive, gen_name, request):
    fast = request.getfixturevalue(gen_name)
    assert fast.variant == "adapter"  # merged at load from final_model/
    preps = [fast.prepare(im) for im in IMAGES]
    assert len({p.prompt_len for p in preps}) > 1, "the images must give different prompt lengths (left padding)"
    out = fast.generate(preps)  # 3 images in slots 0-2 -> decode bucket 4 with one inert row
    assert [o.batch_size for o in out] == [3, 3, 3]  # prefilled together
    for got, want in zip(out, naive["tokens"]):
        assert got.token_ids == want[: len(got.token_ids)]
        assert len(got.token_ids) == len(want)
        assert got.prompt_tokens > 0


def test_equal_sized_images_batched_through_the_vision_tower(naive, fast):
    """Consecutive same-size images share one vision attention call; results stay per image."""
    preps = [fast.prepare(IMAGES[0]), fast.prepare(IMAGES[0]), fast.prepare(IMAGES[1]), fast.prepare(IMAGES[1])]
    out = fast.generate(preps)
    assert [o.token_ids for o in out] == [naive["tokens"][0]] * 2 + [naive["tokens"][1]] * 2


@BOTH
def test_single_requests_equal_naive(naive, gen_name, request):
    fast = request.getfixturevalue(gen_name)
    for im, want in zip(IMAGES, naive["tokens"]):
        (got,) = fast.generate([fast.prepare(im)])
        assert got.token_ids == want
        assert got.batch_size == 1


def test_eos_stops_a_row_and_min_new_tokens_suppresses_it(naive, demo_model_dir):
    """Make a token the model emits at step 3 the EOS: both paths stop there, or not before min_new_tokens."""
    from htrd.fastgen import FastGenerator
    from htrd.model import load_model

    target = naive["tokens"][0][3]
    assert target not in naive["tokens"][0][:3]
    model = load_model(demo_model_dir, device="cpu").model
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

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2], max_cache_len=100,
                             max_new_tokens=NEW)
    prep = gen.prepare(IMAGES[0])
    assert prep.prompt_len + NEW > gen.max_cache_len
    (got,) = gen.generate([prep])
    assert got.token_ids == naive["tokens"][0]


@BOTH
def test_more_images_than_slots_wait_for_free_slots(naive, gen_name, request):
    fast = request.getfixturevalue(gen_name)
    preps = [fast.prepare(IMAGES[i % 3]) for i in range(6)]  # 4 slots
    out = fast.generate(preps)
    assert [o.token_ids for o in out] == [naive["tokens"][i % 3] for i in range(6)]
    assert fast.free_slots() == fast.slots == 4 and not fast.running()


def test_warmup_runs_every_prefill_size(fast):
    report = fast.warmup(IMAGES[0], max_new_tokens=8)
    assert set(report["per_batch_ms"]) == {1, 2, 4}
    assert report["prompt_tokens"] == fast.prepare(IMAGES[0]).prompt_len
    assert fast.free_slots() == fast.slots


def test_merged_variant_is_preferred_and_gives_the_same_tokens(naive, demo_model_copy):
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    from htrctl.modeldir import resolve_variant
    from htrd.fastgen import FastGenerator

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
    from htrctl.modeldir import resolve_variant

    with pytest.raises(ModelMissingError, match="merged/config.json does not exist") as exc:
        resolve_variant(demo_model_dir, "merged")
    assert "provision --merge" in exc.value.remedy


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


def _run(gen, schedule, until_done=True):
    """Drive *gen* by hand: schedule = {step number: [Seq, ...]} joins; returns {tag: Finished}."""
    done = {}
    step = 0
    while True:
        for seq in schedule.pop(step, []):
            for f in gen.add([seq]):
                done[f.seq.tag] = f
        for f in gen.step():
            done[f.seq.tag] = f
        step += 1
        if not schedule and not gen.running():
            return done


@BOTH
def test_a_line_joining_midway_gets_the_tokens_it_gets_alone(naive, gen_name, request):
    """Continuous batching: a line's tokens do not depend on when it joined or who decodes beside it."""
    fast = request.getfixturevalue(gen_name)
    from htrd.generation import Seq

    preps = [fast.prepare(im) for im in IMAGES]
    done = _run(fast, {0: [Seq(preps[0], NEW, tag="first")], 2: [Seq(preps[1], NEW, tag="late")],
                       3: [Seq(preps[2], NEW, tag="later")]})
    assert done["first"].token_ids == naive["tokens"][0]
    assert done["late"].token_ids == naive["tokens"][1]
    assert done["later"].token_ids == naive["tokens"][2]
    assert all(f.group == 1 for f in done.values())


@BOTH
def test_lines_added_while_steps_run_join_the_next_call_with_their_solo_tokens(naive, gen_name, request):
    """step(during=...): newcomers prefilled while the launched steps run (before the host reads their
    results) take no part in those steps, are not reported by that call, and get the tokens they get alone;
    the running line is unaffected. A line that ends in the same call still leaves with the right tokens."""
    fast = request.getfixturevalue(gen_name)
    from htrd.generation import Seq

    preps = [fast.prepare(im) for im in IMAGES]
    fast.add([Seq(preps[0], NEW, tag="first"), Seq(preps[1], 3, tag="short")])
    calls, done, joined = 0, {}, []

    def join():
        if calls == 1:  # the call in which "short" ends (3 tokens: the prefill's and two steps)
            before = fast.steps_run
            fast.add([Seq(preps[2], NEW, tag="during")])
            assert fast.steps_run == before
            joined.append(sorted(s.tag for s in fast.running()))

    while fast.running():
        calls += 1
        out = fast.step(during=join)
        if calls == 1:
            assert [f.seq.tag for f in out] == ["short"]  # not "during": it joined after these steps
        done.update({f.seq.tag: f for f in out})
    assert joined == [["during", "first", "short"]]
    assert done["short"].token_ids == naive["tokens"][1][:3]
    assert done["first"].token_ids == naive["tokens"][0]
    assert done["during"].token_ids == naive["tokens"][2]


@BOTH
def test_a_short_line_leaves_early_and_its_slot_is_reused(naive, gen_name, request):
    """A 3-token line beside a 24-token one finishes after its own tokens, not the long line's; the freed
    slot takes the next line while the long one still decodes."""
    fast = request.getfixturevalue(gen_name)
    from htrd.generation import Seq

    long_, short = fast.prepare(IMAGES[0]), fast.prepare(IMAGES[1])
    fast.add([Seq(long_, NEW, tag="long"), Seq(short, 3, tag="short")])
    steps_to = {}
    n = 0
    while fast.running():
        n += 1
        for f in fast.step():
            steps_to[f.seq.tag] = (n, f)
            if f.seq.tag == "short":
                assert [s.tag for s in fast.running()] == ["long"]
                fast.add([Seq(fast.prepare(IMAGES[2]), NEW, tag="next")])
    assert steps_to["short"][1].token_ids == naive["tokens"][1][:3]
    assert steps_to["short"][0] < steps_to["long"][0]
    assert steps_to["long"][1].token_ids == naive["tokens"][0]
    assert steps_to["next"][1].token_ids == naive["tokens"][2]


def test_a_line_is_answered_right_after_its_last_token(fast):
    """step() runs several decode steps per call, but never past the nearest line's max_new_tokens: a
    6-token line (the prefill chooses the first) leaves after exactly 5 decode steps, not a multiple of
    STEPS_PER_CALL, while a longer line keeps decoding."""
    from htrd.fastgen import STEPS_PER_CALL
    from htrd.generation import Seq

    assert STEPS_PER_CALL > 2 and 5 % STEPS_PER_CALL
    fast.add([Seq(fast.prepare(IMAGES[0]), 6, tag="six"), Seq(fast.prepare(IMAGES[1]), NEW, tag="long")])
    start = fast.steps_run
    done = []
    while not done:
        done = fast.step()
    assert [f.seq.tag for f in done] == ["six"] and len(done[0].token_ids) == 6
    assert fast.steps_run - start == 5
    while fast.running():
        fast.step()


def test_with_many_lines_running_a_line_at_its_limit_waits_frozen_for_the_check(naive, demo_model_dir):
    """Beyond STOP_AT_LAST_TOKEN_LINES running lines, step() runs STEPS_PER_CALL steps per host check: a
    6-token line among long ones stops at its limit on the device (no token past it, the same tokens as
    naive) and leaves at the end of that call; the long lines are unaffected."""
    from htrd.fastgen import STEPS_PER_CALL, STOP_AT_LAST_TOKEN_LINES, FastGenerator
    from htrd.generation import Seq

    n = STOP_AT_LAST_TOKEN_LINES + 1
    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4, 8],
                             max_cache_len=512, max_new_tokens=NEW)
    assert 5 % STEPS_PER_CALL and n <= gen.slots
    gen.add([Seq(gen.prepare(IMAGES[0]), 6, tag="six")]
            + [Seq(gen.prepare(IMAGES[1]), NEW, tag=f"long{i}") for i in range(n - 1)])
    start, done = gen.steps_run, []
    while not done:
        done = gen.step()
    assert [f.seq.tag for f in done] == ["six"]
    assert done[0].token_ids == naive["tokens"][0][:6]
    assert gen.steps_run - start == _round_up(5, STEPS_PER_CALL) and gen.step_calls * STEPS_PER_CALL >= 5
    rest = []
    while gen.running():
        rest += gen.step()
    assert sorted(f.seq.tag for f in rest) == sorted(f"long{i}" for i in range(n - 1))
    assert all(f.token_ids == naive["tokens"][1] for f in rest)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


@BOTH
def test_stop_takes_a_running_line_out_and_the_others_continue(naive, gen_name, request):
    fast = request.getfixturevalue(gen_name)
    from htrd.generation import Seq

    preps = [fast.prepare(im) for im in IMAGES[:2]]
    fast.add([Seq(preps[0], NEW, tag="expired"), Seq(preps[1], NEW, tag="alive")])
    out = fast.step(lambda s: s.tag == "expired")
    assert [f.seq.tag for f in out] == ["expired"] and out[0].stopped
    assert 1 <= len(out[0].token_ids) < NEW
    rest = []
    while fast.running():
        rest += fast.step()
    assert [f.seq.tag for f in rest] == ["alive"] and not rest[0].stopped
    assert rest[0].token_ids == naive["tokens"][1]


def test_mixed_steps_chunk_prompts_across_steps_and_joining_lines_get_their_solo_tokens(naive, demo_model_dir):
    """Mixed steps with a small prompt budget (16 tokens a step, in buckets of 8 and 16): every prompt spans
    several steps -- each chunk attends to its line's earlier positions in the cache and to itself, causally
    -- and the decode rows of running lines ride along. A line alone, two joining after three steps (chunks
    of two lines in one step), and one stopped while its prompt is still being prefilled (answered at once,
    stopped, no tokens; the others unaffected): naive's tokens for each (fp32 on the CPU)."""
    from htrd.fastgen import FastGenerator
    from htrd.generation import Seq

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4, 8], max_cache_len=512,
                             max_new_tokens=NEW, mixed=True, prefill_tokens=16)
    assert gen.mixed and gen.prefill_budgets == [8, 16]
    preps = [gen.prepare(im) for im in IMAGES]
    assert all(p.prompt_len > 3 * 16 for p in preps)
    gen.add([Seq(preps[0], NEW, tag=0)])
    done = gen.step(steps=3)
    assert done == [] and gen._prefills.slots() == [0] and gen.mixed_steps == 3  # still prefilling
    gen.add([Seq(preps[1], NEW, tag=1), Seq(preps[2], NEW, tag=2), Seq(preps[0], NEW, tag="cancelled")])
    done += gen.step(lambda s: s.tag == "cancelled", steps=1)
    assert [(f.seq.tag, f.token_ids, f.stopped) for f in done] == [("cancelled", [], True)]
    assert "cancelled" not in [s.item.tag for s in gen._prefills._lines]
    shared = 0
    while gen.running():
        before = gen.mixed_steps
        plans = gen._prefills.plan(1)
        shared += len(plans[0].chunks) > 1
        done += gen.step(steps=1)
        assert gen.mixed_steps == before + bool(plans[0].chunks)
    assert shared  # a step took the end of one prompt and the start of the next
    assert {f.seq.tag: f.token_ids for f in done if f.seq.tag != "cancelled"} == {
        i: naive["tokens"][i] for i in range(3)}
    steps = sum(-(-p.prompt_len // 16) for p in preps)
    assert steps - 2 <= gen.mixed_steps <= steps + 2  # about one step per 16 prompt tokens, none idle


def test_generate_stop_callback_ends_every_line(fast):
    preps = [fast.prepare(im) for im in IMAGES]
    calls = []
    out = fast.generate(preps, stop=lambda: calls.append(1) or len(calls) >= 2)
    assert all(o.stopped for o in out)
    assert all(len(o.token_ids) < NEW for o in out)
    assert fast.free_slots() == fast.slots


def test_preprocessing_equals_the_processor_and_caches_the_prompt_per_grid(fast):
    """prepare() = image processor + prompt ids cached per image grid; equal to the processor's own encoding."""
    pre = fast.pre
    hits0 = pre.encoder.hits
    for im in IMAGES + [stroke_line(1200, 160, 9), stroke_line(333, 48, 4), stroke_line(2000, 120, 5)]:
        p = pre.prepare(im)
        full = pre.encode_full(im)
        assert torch.equal(p.input_ids, full["input_ids"][0])
        assert torch.equal(p.image_grid_thw, full["image_grid_thw"])
        assert torch.equal(p.pixel_values, full["pixel_values"].to(p.pixel_values.dtype))
        if "mm_token_type_ids" in full:
            assert torch.equal(p.mm_token_type_ids, full["mm_token_type_ids"][0])
    assert pre.encoder.hits > hits0  # the second 1200x160 line reused the first one's prompt ids


def test_prompt_layout_equals_hf_positions_and_image_placement(fast):
    """The host-built prefill layout of a left-padded batch: M-RoPE positions equal HF's get_rope_index over
    the same padded batch (at every real token), the image index points at exactly the image tokens, and
    the vision lengths are the images' patch counts."""
    from htrd.model import collate, prompt_layout

    preps = [fast.prepare(im) for im in IMAGES]
    assert len({p.prompt_len for p in preps}) > 1
    batch = collate(preps, pad_id=fast.pad_id, device="cpu", dtype=torch.float32)
    layout = prompt_layout(preps, device="cpu")
    kw = {"mm_token_type_ids": batch["mm_token_type_ids"]} if "mm_token_type_ids" in batch else {}
    want, deltas = fast.pre._rope_index(input_ids=batch["input_ids"], image_grid_thw=batch["image_grid_thw"],
                                        attention_mask=batch["attention_mask"], **kw)
    real = batch["attention_mask"].bool()
    for axis in range(3):
        assert torch.equal(layout.position_ids[axis][real], want[axis][real])
    image_token = fast.model.config.image_token_id
    assert torch.equal(layout.image_index, (batch["input_ids"].reshape(-1) == image_token).nonzero().squeeze(1))
    assert layout.vision_lengths == [int(p.image_grid_thw[0, 1] * p.image_grid_thw[0, 2]) for p in preps]
    # rope_span (max position + 1) = HF's rope delta + the prompt's length: what decoding continues from
    assert [p.rope_span for p in preps] == [int(d) + p.prompt_len for d, p in zip(deltas.flatten(), preps)]


def test_vision_tower_with_cached_grid_inputs_equals_hf_forward(fast):
    """The vision tower as prefills run it (per-grid inputs cached, block sizes from the host) gives HF's
    forward's image tokens and deepstack features exactly, on a batch of three widths (two alike); both embed the
    patches by one GEMM (HF's Conv3d swapped out), which gives the convolution's values."""
    from htrd.model import collate, prompt_layout
    from htrd.vision import _split

    preps = [fast.prepare(im) for im in (IMAGES[0], IMAGES[1], IMAGES[1], IMAGES[2])]
    batch = collate(preps, pad_id=fast.pad_id, device="cpu", dtype=torch.float32)
    layout = prompt_layout(preps, device="cpu")
    assert layout.grids == [tuple(p.image_grid_thw[0].tolist()) for p in preps]
    assert fast.vision.own
    with torch.inference_mode():
        image, deepstack = fast.vision(batch["pixel_values"], batch["image_grid_thw"], layout.grids,
                                       layout.vision_lengths)
        fast.vision.lengths = None  # HF's own forward, unbatched attention from cu_seqlens
        ref_image, ref_deep = _split(fast.model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]))
    assert len(deepstack) == len(ref_deep) > 0
    for got, want in zip([image, *deepstack], [ref_image, *ref_deep]):
        assert torch.equal(got, want)
    conv = fast.model.model.visual.patch_embed.proj  # the GEMM against the module's own convolution
    assert torch.allclose(fast.model.model.visual.patch_embed(batch["pixel_values"]),
                          conv(batch["pixel_values"].view(-1, conv.in_channels, *conv.kernel_size)).flatten(1),
                          atol=1e-5, rtol=1e-5)
    assert fast.vision.check(batch["pixel_values"], batch["image_grid_thw"], layout.grids, layout.vision_lengths)


def test_vision_helpers_that_changed_fall_back_to_hf_forward(fast, monkeypatch, caplog):
    """A transformers release whose vision helpers take other arguments: the tower logs it and serves through
    HF's own forward (the same image tokens), instead of failing the request."""
    from transformers import vision_utils

    from htrd.model import collate, prompt_layout

    def changed(*args, **kwargs):
        raise TypeError("unexpected keyword argument 'num_grid_per_side'")

    tower = fast.vision
    preps = [fast.prepare(IMAGES[1])]
    batch = collate(preps, pad_id=fast.pad_id, device="cpu", dtype=torch.float32)
    layout = prompt_layout(preps, device="cpu")
    with torch.inference_mode():
        want = tower(batch["pixel_values"], batch["image_grid_thw"], layout.grids, layout.vision_lengths)
        monkeypatch.setattr(tower, "own", True)  # restored after the test, as is the grid cache
        monkeypatch.setattr(tower, "_grids", {})
        monkeypatch.setattr(vision_utils, "get_vision_interpolation_indices_and_weights", changed)
        got = tower(batch["pixel_values"], batch["image_grid_thw"], layout.grids, layout.vision_lengths)
    assert not tower.own and "do not take what they did" in caplog.text
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def _stand_in_graphs(gen, kind) -> list:
    """Prefill graphs on the CPU: *gen*'s capture replaced by a stand-in whose replay runs the recorded call
    on its static inputs (what a CUDA graph replay computes). Returns the list that names each capture
    (*kind(inputs)*), in order; ``gen.stand_in_direct`` says for each whether it was captured without an
    eager run first (FastGenerator._record's *direct*)."""
    from htrd.fastgen import _PrefillGraph

    captured = []

    def record(fn, inputs, last, keep, direct=False, out=None):
        if out is None:
            out = torch.empty(last.shape, dtype=last.dtype)  # *last* may be on the meta device

        class Replay:
            def replay(self):
                out.copy_(fn())

        captured.append(kind(inputs))
        gen.stand_in_direct.append(direct)
        return _PrefillGraph(Replay(), inputs, out, keep)

    gen.stand_in_direct = []
    gen._prefill_graphs_ok = True  # as on CUDA
    gen._record = record
    return captured


def test_small_prefills_replay_graphs_with_the_new_lines_inputs_and_slots(naive, demo_model_dir):
    """The prefill-graph bookkeeping on the CPU, with a stand-in for the CUDA graph whose replay runs the
    recorded call on its static inputs. A small prefill's prompt is padded to PREFILL_BUCKET positions; the
    language model's part is captured per (lines, padded width) on its LM_GRAPH_AFTER-th prefill, the whole
    prefill per exact shape (width, image grids) on its PREFILL_GRAPH_AFTER-th; never for more than
    PREFILL_GRAPH_LINES lines. A replay takes the new line's embeddings, pixels, positions and slot: a line
    of another grid but the same padded width (language-model graph) and a line of the same shape but other
    pixels (whole graph), each joining while another line decodes -- naive's tokens for every line."""
    from htrd.fastgen import (LM_GRAPH_AFTER, PREFILL_BUCKET, PREFILL_GRAPH_AFTER, PREFILL_GRAPH_LINES,
                              FastGenerator, _round_up)
    from htrd.generation import Seq

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4, 8],
                             max_cache_len=512, max_new_tokens=NEW)
    gen.packed = False  # the left-padded prefill: GPUs without flash attention's variable-length kernel
    captured = _stand_in_graphs(gen, lambda inputs: "whole" if inputs[0].dtype == torch.long else "lm")
    a = gen.prepare(IMAGES[0])
    other_grid = stroke_line(1000, 160, 9)  # another grid, the same padded width
    b = gen.prepare(other_grid)
    assert b.image_grid_thw.tolist() != a.image_grid_thw.tolist()
    assert _round_up(b.prompt_len, PREFILL_BUCKET) == _round_up(a.prompt_len, PREFILL_BUCKET) != a.prompt_len
    same_shape = stroke_line(1200, 160, 7)  # IMAGES[0]'s size, other strokes
    assert LM_GRAPH_AFTER < PREFILL_GRAPH_AFTER
    for k in range(LM_GRAPH_AFTER):
        assert captured == [] and gen.prefill_replays == 0
        assert gen.generate([a])[0].token_ids == naive["tokens"][0]  # padded to the bucket: the same tokens
    assert captured == ["lm"]

    def beside(prep, tag):  # *prep* joins (slot 1) while IMAGES[1] decodes in slot 0
        gen.add([Seq(gen.prepare(IMAGES[1]), NEW, tag="running")])
        gen.step()
        replays = gen.prefill_replays
        gen.add([Seq(prep, NEW, tag=tag)])
        assert gen.prefill_replays == replays + 1
        done = {}
        while gen.running():
            done.update({f.seq.tag: f.token_ids for f in gen.step()})
        return done

    assert beside(b, "lm") == {"running": naive["tokens"][1],
                               "lm": _naive_tokens(naive["model"], naive["processor"], other_grid)}
    for k in range(PREFILL_GRAPH_AFTER - LM_GRAPH_AFTER):
        assert gen.generate([a])[0].token_ids == naive["tokens"][0]
    assert captured == ["lm", "whole"]
    assert beside(gen.prepare(same_shape), "same") == {
        "running": naive["tokens"][1], "same": _naive_tokens(naive["model"], naive["processor"], same_shape)}
    big = [gen.prepare(IMAGES[0])] * (PREFILL_GRAPH_LINES + 1)
    for _ in range(PREFILL_GRAPH_AFTER + 1):
        gen.generate(big)
    assert captured == ["lm", "whole"]  # more lines than PREFILL_GRAPH_LINES: never captured


def test_the_vision_tower_over_padded_patches_gives_the_images_own_outputs(demo_model_dir):
    """VisionTower.padded: the patches padded to a 256-row bucket with one more image (its own attention
    block, boundaries in a tensor), two lines of different sizes in one call -- each real image token and
    deepstack feature as the unpadded forward's; stale values in the padding rows change nothing, nor do
    empty blocks after them (the boundaries padded to a prefill chunk of 5 images)."""
    from htrd.fastgen import FastGenerator
    from htrd.model import prompt_layout

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2], max_cache_len=512,
                             max_new_tokens=NEW)
    vt = gen.vision
    items = [gen.prepare(IMAGES[0]), gen.prepare(IMAGES[1])]
    batch, layout = gen._collate(items), prompt_layout(items, device="cpu")
    px = batch["pixel_values"]
    with torch.inference_mode():
        want = vt(px, batch["image_grid_thw"], layout.grids, layout.vision_lengths)
        rows = vt.rows_for(int(px.shape[0]))
        assert rows % 256 == 0 and rows - px.shape[0] >= 4
        for fill, blocks in ((0.0, None), (7.0, None), (7.0, 5)):  # zeros, another image's leftovers; empty blocks
            inputs = vt.padded_inputs(px, layout.grids, layout.vision_lengths, rows, blocks=blocks)
            for t in inputs[:4]:
                t[px.shape[0]:] = fill
            empty = [rows] * (blocks - len(items) if blocks else 0)
            assert inputs[4].tolist() == [0, *itertools.accumulate(layout.vision_lengths), rows, *empty]
            out = vt.padded(*inputs)
            k = int(want[0].shape[0])
            assert out.shape[0] == 1 + len(want[1]) and out.shape[1] == rows // vt.merge
            for got, ref in zip(out, [want[0], *want[1]]):
                torch.testing.assert_close(got[:k], ref, rtol=1e-5, atol=1e-5)


def test_the_vision_span_bounds_every_block_of_a_padded_call(demo_model_dir, monkeypatch):
    """VisionTower.span_for -- what the padded tower's flash attention is told of the longest block (its grid
    has a row of thread blocks per 128 positions of it for every image and head): VISION_SPAN where every image
    fits, never less than the padding image can be (ROW_BUCKET + PAD_ROWS), never more than the rows; the
    rows where an image is longer (that prefill then runs uncaptured: tests/test_fastgen_gpu.py)."""
    from htrd import vision
    from htrd.fastgen import FastGenerator

    vt = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1], max_cache_len=512,
                            max_new_tokens=NEW).vision
    span = vision.VISION_SPAN
    assert span >= vision.ROW_BUCKET + vision.PAD_ROWS
    assert vt.span_for(16384) == span and vt.span_for(16384, [760] * 16 + [span]) == span
    assert vt.span_for(16384, [760, span + 1]) == 16384  # an image past the span: told the rows
    assert vt.span_for(1024, [700]) == 1024  # never more than the rows
    monkeypatch.setattr(vision, "VISION_SPAN", 8)
    assert vt.span_for(4096) == vision.ROW_BUCKET + vision.PAD_ROWS  # the padding image always fits


def test_the_vision_check_turns_the_padded_tower_off_where_it_fails_or_differs(demo_model_dir, monkeypatch, caplog):
    """The warm-up's check of VisionTower.padded (on by default on a GPU with flash attention): kept where it
    gives the forward's outputs; turned off, logged, and the tower still served, where it raises (a GPU or
    torch whose flash attention refuses) or where its outputs differ beyond half-precision rounding."""
    from htrd.fastgen import FastGenerator
    from htrd.model import prompt_layout

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2], max_cache_len=512,
                             max_new_tokens=NEW)
    vt = gen.vision
    items = [gen.prepare(IMAGES[0]), gen.prepare(IMAGES[1])]
    batch, layout = gen._collate(items), prompt_layout(items, device="cpu")
    args = (batch["pixel_values"], batch["image_grid_thw"], layout.grids, layout.vision_lengths)
    assert not vt.varlen  # a CPU: off
    vt.varlen = True
    with torch.inference_mode():
        assert vt.check(*args) and vt.varlen
        padded = vt.padded

        def refuses(*a, **kw):
            raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

        monkeypatch.setattr(vt, "padded", refuses)
        assert vt.check(*args) and not vt.varlen and vt.own
        assert "fails here (FlashAttention only supports Ampere GPUs or newer.)" in caplog.text
        vt.varlen = True
        monkeypatch.setattr(vt, "padded", lambda *a, **kw: padded(*a, **kw) * 1.05)
        assert vt.check(*args) and not vt.varlen and vt.own
        assert "over padded patches (flash attention, variable lengths) differs" in caplog.text


def test_where_host_memory_cannot_be_pinned_lines_are_still_served(demo_model_dir, caplog, monkeypatch):
    """On a GPU host the patches are pinned as they are prepared (their copy to the GPU then never waits for
    queued decode steps). Where pinning fails -- here a CPU-only torch, which has no pinned memory -- the
    patches stay pageable, once logged, and the line gets the same tokens."""
    import threading

    import htrd.model
    from htrd.fastgen import FastGenerator

    monkeypatch.setattr(htrd.model, "_pin_failed", threading.Event())  # "logged once" counts from here
    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2], max_cache_len=512,
                             max_new_tokens=NEW)
    want = gen.generate([gen.prepare(IMAGES[0])])[0].token_ids
    gen.pre._pin = True  # as on a GPU host
    preps = [gen.prepare(IMAGES[0]) for _ in range(2)]
    assert not preps[0].pixel_values.is_pinned()
    assert caplog.text.count("cannot pin host memory") == 1
    assert [g.token_ids for g in gen.generate(preps)] == [want, want]


def test_prefills_replay_the_vision_tower_per_padded_patch_bucket(naive, demo_model_dir):
    """With the padded vision tower on (a GPU's default, here with a stand-in graph whose replay runs the
    recorded call on its static inputs): a prefill's vision tower is captured per padded patch rows on its
    first prefill and replayed for a line of another grid in the same bucket, joining while another line
    decodes, and for two lines of other sizes together (the attention blocks' boundaries are padded to the
    prefill chunk, so the number of lines does not matter) -- naive's tokens for every line."""
    from htrd.fastgen import FastGenerator
    from htrd.generation import Seq

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512,
                             max_new_tokens=NEW)
    gen.vision.varlen = True  # as on a GPU (the CPU runs the blocks' attention in a loop)
    captured = _stand_in_graphs(gen, lambda inputs: "vision" if inputs[-1].dtype == torch.int32 else "other")
    a = gen.prepare(IMAGES[0])
    other = stroke_line(800, 150, 11)
    b = gen.prepare(other)
    assert b.image_grid_thw.tolist() != a.image_grid_thw.tolist()
    assert gen.vision.rows_for(int(a.pixel_values.shape[0])) == gen.vision.rows_for(int(b.pixel_values.shape[0]))
    assert gen.generate([a])[0].token_ids == naive["tokens"][0]
    assert captured.count("vision") == 1 and gen.vision_replays == 0
    gen.add([Seq(gen.prepare(IMAGES[1]), NEW, tag="running")])  # another grid, the same bucket: a replay
    gen.step()
    gen.add([Seq(b, NEW, tag="joined")])
    assert gen.vision_replays == 2 and captured.count("vision") == 1
    done = {}
    while gen.running():
        done.update({f.seq.tag: f.token_ids for f in gen.step()})
    assert done == {"running": naive["tokens"][1], "joined": _naive_tokens(naive["model"], naive["processor"], other)}
    pair = [gen.prepare(IMAGES[1]), gen.prepare(IMAGES[2])]
    assert gen.vision.rows_for(sum(int(p.pixel_values.shape[0]) for p in pair)) == gen.vision.rows_for(
        int(a.pixel_values.shape[0]))
    assert [g.token_ids for g in gen.generate(pair)] == naive["tokens"][1:3]
    assert gen.vision_replays == 3 and captured.count("vision") == 1


def test_new_prefill_shapes_after_the_first_are_captured_without_an_eager_run(naive, demo_model_dir):
    """A prefill of a new padded width (language model) or new patch-row count (vision tower) after the first
    graph of its kind: captured straight away and replayed for its own result -- no eager run first (it cost
    ~30-80 ms of launching with the GPU idle on an H200) -- with naive's tokens. The first of each kind still
    runs eagerly first (it loads the kernels the capture records)."""
    from htrd.fastgen import FastGenerator

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4, 8], max_cache_len=512,
                             max_new_tokens=NEW)
    gen.vision.varlen = True  # as on a GPU (the CPU runs the blocks' attention in a loop)
    captured = _stand_in_graphs(gen, lambda inputs: "vision" if inputs[-1].dtype == torch.int32 else "lm")
    a = gen.prepare(IMAGES[0])
    assert gen.generate([a])[0].token_ids == naive["tokens"][0]
    assert captured == ["vision", "lm"] and gen.stand_in_direct == [False, False]
    eager_runs = []
    real_layers, real_padded = gen._packed_layers, gen.vision.padded
    gen._packed_layers = lambda *a: eager_runs.append("lm") or real_layers(*a)
    lines = [stroke_line(1900 - 150 * i, 160, 14 + i) for i in range(6)]  # together: more patch rows, more tokens
    group = [gen.prepare(im) for im in lines]
    patches = sum(int(p.pixel_values.shape[0]) for p in group)
    assert gen.vision.rows_for(patches) != gen.vision.rows_for(int(a.pixel_values.shape[0]))
    assert [g.token_ids for g in gen.generate(group)] == [_naive_tokens(naive["model"], naive["processor"], im)
                                                         for im in lines]
    assert captured == ["vision", "lm", "vision", "lm"] and gen.stand_in_direct == [False, False, True, True]
    # the stand-in's replays ran _packed_layers (as the graph would); nothing ran it eagerly before the capture
    assert eager_runs == ["lm"] and gen.vision.padded == real_padded


def test_quiet_precapture_prepares_every_width_and_row_count_a_later_prefill_replays(naive, demo_model_dir,
                                                                                      monkeypatch):
    """precapture_next (the engine calls it while quiet): one graph per call, language-model widths and vision
    row counts largest first (the shared memory pool reuses its blocks), each captured directly on stand-in inputs, up to prefills of prefill_chunk lines
    of PRECAPTURE_LINE_TOKENS; then False. A later prefill of a precaptured size captures nothing and replays
    the graph with its own inputs: naive's tokens. Nothing to precapture before the first graph of a kind."""
    import htrd.fastgen as fg
    from htrd.fastgen import FastGenerator, _pack_width

    monkeypatch.setattr(fg, "PRECAPTURE_LINE_TOKENS", 160)
    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512,
                             max_new_tokens=NEW, prefill_chunk=2)
    gen.vision.varlen = True  # as on a GPU (the CPU runs the blocks' attention in a loop)
    captured = _stand_in_graphs(gen, lambda inputs: ("vision", inputs[0].shape[0]) if inputs[-1].dtype == torch.int32
                                else ("lm", _pack_width(int(inputs[0].shape[0]))))
    assert not gen.precapture_next() and captured == []  # nothing captured yet: no kind to capture directly
    a = gen.prepare(IMAGES[0])
    assert gen.generate([a])[0].token_ids == naive["tokens"][0]
    first = list(captured)
    while gen.precapture_next():
        pass
    ahead = captured[len(first):]
    widths = sorted({_pack_width(t) for t in range(64, 2 * 160 + 1, 8)} - {w for k, w in first if k == "lm"})
    assert [w for k, w in ahead if k == "lm"] == widths[::-1] and gen.precaptured == len(ahead)  # largest first
    assert [r for k, r in ahead if k == "vision"] == [r for r in range(gen.vision.rows_for(2 * 4 * 256), 0, -256)
                                                      if ("vision", r) not in first]
    assert all(gen.stand_in_direct[len(first):]) and not gen.precapture_next()
    pair = [gen.prepare(IMAGES[1]), gen.prepare(IMAGES[2])]
    assert _pack_width(sum(p.prompt_len for p in pair)) in widths
    replays = gen.prefill_replays
    assert [g.token_ids for g in gen.generate(pair)] == naive["tokens"][1:3]
    assert len(captured) == len(first) + len(ahead) and gen.prefill_replays == replays + 1


def test_quiet_precapture_stops_while_the_gpu_is_short_of_memory(naive, demo_model_dir, monkeypatch, caplog):
    """With less than PRECAPTURE_MIN_FREE of the GPU's memory free (the KV cache left KV_RESERVE_FRACTION for
    prefill activations), precapture_next captures nothing, says so once and ends the quiet work."""
    import htrd.fastgen as fg
    from htrd.fastgen import FastGenerator

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2], max_cache_len=512,
                             max_new_tokens=NEW)
    captured = _stand_in_graphs(gen, lambda inputs: int(inputs[0].shape[0]))
    assert gen.generate([gen.prepare(IMAGES[0])])[0].token_ids == naive["tokens"][0]
    first = list(captured)
    total = 80 * 2**30
    monkeypatch.setattr(gen, "device", torch.device("cuda"))  # only mem_get_info below is asked
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(total * fg.PRECAPTURE_MIN_FREE) - 1, total))
    with caplog.at_level("INFO", logger="htrd.fastgen"):
        assert not gen.precapture_next()
    assert captured == first and gen.precaptured == 0 and "not capturing prefill graphs ahead of need" in caplog.text
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total // 2, total))
    assert not gen.precapture_next() and captured == first  # ended for good, even with memory freed later


def test_packed_prefills_replay_one_graph_per_padded_width(naive, demo_model_dir):
    """Packed prefills (every prompt back to back from cache position 0; what a GPU with flash attention and
    the CPU run): the language model's part is captured per padded token count (_pack_width) on its first
    prefill and replayed by every later prefill of that count, whatever its lines -- one line or two of other
    sizes, joining while others decode. A stand-in graph replays the recorded call on its static inputs;
    naive's tokens for every line, and padding tokens write only the cache's scratch row."""
    from htrd.fastgen import FastGenerator, _pack_width
    from htrd.generation import Seq

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512,
                             max_new_tokens=NEW)
    assert gen.packed
    captured = _stand_in_graphs(gen, lambda inputs: _pack_width(int(inputs[0].shape[0])))
    a, b, c = (gen.prepare(im) for im in IMAGES)
    assert gen.generate([a])[0].token_ids == naive["tokens"][0]
    width = _pack_width(a.prompt_len)
    assert captured == [width] and gen.prefill_replays == 0 and width > a.prompt_len
    for li in (0, len(gen.layers) - 1):  # slot 0's prompt; its padding in the scratch row, no other slot
        assert not gen.k_cache[li][1:].any() and not gen.v_cache[li][1:].any()
        assert gen.k_cache[li][0, :, : a.prompt_len].abs().sum(-1).all() and gen._k_rows[li][-1].any()
    assert gen.generate([a])[0].token_ids == naive["tokens"][0]
    assert captured == [width] and gen.prefill_replays == 1
    pair = _pack_width(b.prompt_len + c.prompt_len)
    gen.add([Seq(a, NEW, NEW, tag=0)])
    done = gen.step(steps=3)
    gen.add([Seq(c, NEW, NEW, tag=2), Seq(b, NEW, NEW, tag=1)])  # joining together, while line 0 decodes
    while gen.running():
        done += gen.step()
    assert {f.seq.tag: f.token_ids for f in done} == dict(enumerate(naive["tokens"][:3]))
    assert captured.count(pair) == 1 and gen.prefill_replays == 2 + (pair == width)


def test_the_packed_attention_check_passes_it_and_catches_wrong_bounds(fast, monkeypatch):
    """The start-up check of packed prefills' attention (on a GPU: flash attention's variable-length kernel)
    against SDPA over all rows with a block-diagonal causal mask: it passes the CPU's attention per line, and
    attention that reads the lines' bounds 8 tokens off fails it (prompts are then left-padded)."""
    import htrd.fastgen as fg

    assert fast._packed_attention_ok()
    real = fg.packed_attention

    def shifted(q, k, v, cu, **kw):
        off = (cu + 8).clamp(max=int(cu[-1]))
        off[0] = 0
        return real(q, k, v, off, **kw)

    monkeypatch.setattr(fg, "packed_attention", shifted)
    assert not fast._packed_attention_ok()


def test_full_prefill_graph_caches_capture_no_more_and_drop_none(naive, demo_model_dir, monkeypatch):
    """More recurring shapes than the whole-prefill cache holds (here 1): the first to recur keeps its graph
    and replays it; the second is never captured whole -- a full cache that dropped its least recent graph
    would re-capture on nearly every prefill -- and replays the language model's graph instead. With that
    cache full too, a new (lines, width) prefills eagerly, uncaptured. Naive's tokens throughout."""
    import htrd.fastgen as fg
    from htrd.fastgen import PREFILL_GRAPH_AFTER, FastGenerator

    monkeypatch.setattr(fg, "PREFILL_GRAPHS", 1)
    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512,
                             max_new_tokens=NEW)
    gen.packed = False  # the left-padded prefill: GPUs without flash attention's variable-length kernel
    captured = _stand_in_graphs(gen, lambda inputs: "whole" if inputs[0].dtype == torch.long else "lm")
    a, b = gen.prepare(IMAGES[0]), gen.prepare(IMAGES[1])
    for _ in range(PREFILL_GRAPH_AFTER + 2):
        assert gen.generate([a])[0].token_ids == naive["tokens"][0]
        assert gen.generate([b])[0].token_ids == naive["tokens"][1]
    assert captured.count("whole") == 1 and len(gen._prefill_graphs) == 1
    replays = gen.prefill_replays
    assert gen.generate([b])[0].token_ids == naive["tokens"][1]
    assert gen.prefill_replays == replays + 1 and captured.count("whole") == 1  # b: the language model's graph
    gen.lm_graph_limit = len(gen._lm_graphs)
    before = len(captured)
    c = gen.prepare(IMAGES[2])
    assert [g.token_ids for g in gen.generate([c, c])] == [naive["tokens"][2]] * 2  # (2 lines, width): new
    assert len(captured) == before


def test_small_prefills_pad_to_the_bucket_only_where_the_cache_has_room(demo_model_dir):
    """The padded width of a small prefill (graphs on): the longest prompt rounded up to PREFILL_BUCKET while
    the padded prompt plus the group's new tokens fit the cache; else the group's own width (None), as for
    groups of more than PREFILL_GRAPH_LINES lines or with the graphs off (the CPU's default)."""
    from htrd.fastgen import PREFILL_BUCKET, PREFILL_GRAPH_LINES, FastGenerator, _round_up
    from htrd.generation import Seq

    gen = FastGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2, 4, 8],
                             max_cache_len=192, max_new_tokens=100)
    a = gen.prepare(IMAGES[0])
    padded = _round_up(a.prompt_len, PREFILL_BUCKET)
    assert a.prompt_len < padded and padded + 24 <= 192
    assert gen._graph_width([Seq(a, 24)]) is None  # graphs off
    gen._prefill_graphs_ok = True
    assert gen._graph_width([Seq(a, 24)]) == padded
    room = 192 - a.prompt_len  # fits unpadded, not padded
    assert padded + room > 192 and gen._graph_width([Seq(a, room)]) is None
    assert gen._graph_width([Seq(a, 24), Seq(a, room)]) is None  # the group's longest decides
    assert gen._graph_width([Seq(a, 24)] * (PREFILL_GRAPH_LINES + 1)) is None


def test_host_turnaround_is_counted_between_checks_while_lines_run(fast):
    """The GPU-idle gap from a host check to the next launch: one per step() call that leaves lines running
    (the next step or prefill ends it); none once no line runs."""
    from htrd.generation import Seq

    fast._idle_since, n0 = None, fast.turnarounds
    fast.add([Seq(fast.prepare(IMAGES[0]), 6, tag="six"), Seq(fast.prepare(IMAGES[1]), NEW, tag="long")])
    calls = 0
    while fast.running():
        fast.step()
        calls += 1
    assert calls > 2 and fast.turnarounds - n0 == calls - 1
    assert fast._idle_since is None and fast.turnaround_s >= 0


def test_plain_generator_gives_the_same_tokens(naive, demo_model_dir):
    """The reference path (static_cache: false): HF generate on the unmerged PeftModel, through the same contract."""
    from htrd.plaingen import PlainGenerator

    gen = PlainGenerator.load(demo_model_dir, device="cpu", prompt=PROMPT, batch_sizes=[1, 2], max_new_tokens=NEW)
    assert gen.variant == "adapter"
    out = gen.generate([gen.prepare(im) for im in IMAGES])
    assert [o.token_ids for o in out] == naive["tokens"]
    assert [o.batch_size for o in out] == [2, 2, 1]


def test_one_loader_provision_merge_and_htrd_serve_identical_weights(demo_model_copy):
    """`provision --merge` (htrctl.merge) writes merged/ through htrd.model.load_model, the loader htrd uses:
    the merged variant on disk equals the adapter merged at load, tensor for tensor."""
    from htrctl.merge import merge_adapter
    from htrd.model import load_model

    at_load = load_model(demo_model_copy, device="cpu", variant="adapter", merge=True)
    assert at_load.variant == "adapter" and not hasattr(at_load.model, "peft_config")
    record = merge_adapter(demo_model_copy)
    assert record["dtype"] == "float32"
    on_disk = load_model(demo_model_copy, device="cpu", variant="auto")
    assert on_disk.variant == "merged"
    a, b = at_load.model.state_dict(), on_disk.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prefill_groups_keep_padded_prompts_inside_the_cache(fast):
    """Lines of different widths prefilled together are left-padded to the longest: a group never holds a
    line whose padded prompt plus its new tokens would pass the cache's end (found on the GPU: a short
    prompt with many new tokens grouped with a long prompt wrote past the cache)."""
    from dataclasses import replace

    from htrd.generation import Seq

    base = fast.prepare(IMAGES[0])

    def prep(n):
        return replace(base, input_ids=torch.zeros(n, dtype=torch.long))

    cache = fast.max_cache_len  # 512
    seqs = [Seq(prep(60), NEW), Seq(prep(cache - NEW), NEW), Seq(prep(40), NEW), Seq(prep(cache - 10), 10)]
    groups = fast._chunks(seqs)
    assert [len(g) for g in groups] == [3, 1]  # the 4th would pad the others to cache - 10, past the end
    for group in groups:
        width = max(s.prepared.prompt_len for s in group)
        assert all(width + s.max_new_tokens <= cache for s in group)
    assert fast.prefill_chunk == 16 and [len(g) for g in fast._chunks([Seq(prep(60), NEW)] * 20)] == [16, 4]


def test_lines_joining_together_prefill_in_groups_of_similar_length(naive, fast):
    """More newcomers than one prefill takes: grouped by prompt length, so no line is padded to a much
    longer one's prompt; every line still gets its own tokens."""
    from htrd.generation import Seq

    a, b = fast.prepare(IMAGES[0]), fast.prepare(IMAGES[1])
    assert a.prompt_len != b.prompt_len
    chunk = fast.prefill_chunk
    fast.prefill_chunk = 2
    try:  # alternating lengths: in arrival order every group would pad one line to the other's length
        seqs = [Seq(a, NEW, tag=0), Seq(b, NEW, tag=1), Seq(a, NEW, tag=0), Seq(b, NEW, tag=1)]
        fast.add(seqs)
        for slot, seq in enumerate(fast._seqs):
            if seq is not None:  # the cache span a line reaches: its group's padded prompt + its tokens
                assert fast._need[slot] - NEW == seq.prepared.prompt_len
        done = []
        while fast.running():
            done += fast.step()
    finally:
        fast.prefill_chunk = chunk
    assert sorted(f.seq.tag for f in done) == [0, 0, 1, 1]
    for f in done:
        assert f.token_ids == naive["tokens"][f.seq.tag]


def test_doctor_sizes_the_kv_cache_htrd_allocates(fast, demo_model_dir):
    """One way to size: htrctl.modeldir.kv_cache_bytes (doctor's placement, htrd's GPU choice) equals the
    cache the fast generator allocates (fp32 on the CPU here: 4 bytes an element)."""
    from htrctl.modeldir import kv_cache_bytes

    assert fast.kv_cache_bytes > 0
    assert kv_cache_bytes(demo_model_dir, "auto", slots=fast.slots, max_cache_len=fast.max_cache_len,
                          dtype_bytes=4) == fast.kv_cache_bytes


def test_the_slots_are_the_largest_batch_size_whose_cache_fits(demo_model_dir, monkeypatch, caplog):
    """The fast generator serves the largest of its batch sizes whose KV cache fits in the device's free memory
    less a tenth of it (htrctl.modeldir.slots_that_fit, the rule doctor predicts with) -- host memory on the
    CPU: fewer than configured is logged, not an error; not even one slot is a clear GpuError with a remedy."""
    import logging
    from collections import namedtuple

    import psutil
    from htrd.fastgen import FastGenerator, kv_bytes_per_slot

    from htrctl.errors import GpuError

    kw = {"device": "cpu", "prompt": PROMPT, "batch_sizes": [1, 2, 4, 8], "max_cache_len": 512, "max_new_tokens": NEW}
    probe = FastGenerator.load(demo_model_dir, **kw)
    assert probe.slots == 8  # the demo model's cache fits any host
    per_slot = kv_bytes_per_slot(probe.model, 512)
    mem = namedtuple("mem", "available total")
    total = 1_000 * per_slot
    monkeypatch.setattr(psutil, "virtual_memory", lambda: mem(int(0.1 * total) + 4 * per_slot + per_slot // 2, total))
    with caplog.at_level(logging.INFO, logger="htrd.fastgen"):
        gen = FastGenerator.load(demo_model_dir, **kw)
    assert (gen.slots, gen.batch_sizes) == (4, [1, 2, 4])
    assert "serving 4 slots, the largest of limits.batch_sizes that fits" in caplog.text
    monkeypatch.setattr(psutil, "virtual_memory", lambda: mem(int(0.1 * total) + per_slot // 2, total))
    with pytest.raises(GpuError, match="KV cache for even 1 line") as err:
        FastGenerator.load(demo_model_dir, **kw)
    assert "lower generation.max_cache_len" in err.value.remedy


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "left-padded"])
def test_each_slot_s_first_position_and_position_bound_what_its_mask_lets_it_see(fast, packed):
    """Decode attention on a GPU reads each slot's keys from kv_first to pos (flash attention's offsets,
    attention.kv_spans) instead of masking the span: on lines prefilled together (packed from position 0, or
    left-padded to the group's width), joined later and freed, those bounds are exactly the positions the
    SDPA path's mask marks."""
    was = fast.packed
    fast.packed = packed
    try:
        _check_first_and_pos(fast, packed)
    finally:
        fast.packed = was


def _check_first_and_pos(fast, packed: bool) -> None:
    from htrd.attention import kv_rows, kv_spans
    from htrd.generation import Seq

    preps = [fast.prepare(im) for im in IMAGES]
    fast.add([Seq(preps[0], NEW, tag=0), Seq(preps[1], 3, tag=1)])  # one group: the shorter prompt padded
    fast.step(steps=2)
    fast.add([Seq(preps[2], NEW, tag=2)])
    for _ in range(3):
        fast.step(steps=1)
        B = fast.bucket_for(max(i for i, s in enumerate(fast._seqs) if s is not None) + 1)
        first, pos = fast.kv_first[:B], fast.pos[:B]
        if packed:
            assert not first.any() and len({int(x) for x in pos}) > 1  # from 0, prompts of different lengths
        else:
            assert len({int(x) for x in first}) > 1  # lines with different padding run
        rows = kv_rows(fast.rows[:B], fast.kv_heads, pos, fast.max_cache_len)
        cu_k, used = kv_spans(rows, first, pos, fast.max_cache_len)
        for slot in range(B):
            # the mask marks [first, pos) after a step; the next step adds pos itself, the position it writes
            seen = fast.attend[slot].nonzero().flatten().tolist() + [int(pos[slot])]
            if fast._seqs[slot] is None:
                assert seen == [0, 0] and int(first[slot]) == 0  # a free slot: one position
                continue
            assert seen == list(range(int(first[slot]), int(pos[slot]) + 1))
            for h in range(fast.n_kv):
                i = slot * fast.n_kv + h
                assert int(cu_k[i]) == (slot * fast.n_kv + h) * fast.max_cache_len + int(first[slot])
                assert int(used[i]) == len(seen)
    while fast.running():
        fast.step()
    assert not fast.kv_first.any() and not fast.pos.any()


def test_with_mixed_steps_a_line_whose_staging_fails_is_answered_with_its_error_alone(naive, mixed, monkeypatch,
                                                                                      caplog):
    """Mixed steps stage each joining line's embeddings apart from the steps; when that fails for one line (an
    image the GPU has no room for), the group is retried line by line, the failing line is answered (by add or
    step) as finished with the error and no tokens, its slot is free again, and the other lines -- joining
    with it or already decoding -- get naive's tokens."""
    from htrd.generation import Seq

    preps = [mixed.prepare(im) for im in IMAGES]
    real = mixed._stage_group

    def stage_group(group):
        if any(item.tag == "bad" for *_, item in group):
            raise RuntimeError("CUDA out of memory (stand-in)")
        return real(group)

    monkeypatch.setattr(mixed, "_stage_group", stage_group)
    done = mixed.add([Seq(preps[0], NEW, tag=0)])
    done += mixed.step(steps=2)
    with caplog.at_level("WARNING", logger="htrd.fastgen"):
        done += mixed.add([Seq(preps[1], NEW, tag=1), Seq(preps[2], NEW, tag="bad")])
    assert [(f.seq.tag, f.token_ids, str(f.error)) for f in done] == [("bad", [], "CUDA out of memory (stand-in)")]
    assert "staging them one by one" in caplog.text and mixed.free_slots() == mixed.slots - 2
    while mixed.running():
        done += mixed.step()
    assert {f.seq.tag: f.token_ids for f in done if f.error is None} == {0: naive["tokens"][0], 1: naive["tokens"][1]}
    assert mixed.free_slots() == mixed.slots and len(mixed._prefills) == 0
