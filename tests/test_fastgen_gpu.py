"""On a GPU host (pytest -m gpu): the captured fast path on CUDA against its own eager step and HF generate.

CI has no GPU, so these skip there; run them on a GPU host (bench/device-env.sh).
"""

from __future__ import annotations

import warnings

import pytest
from helpers import stroke_line

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

PROMPT = "Transcribe the handwritten text in this image exactly. Output only the text."
NEW = 32


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (run on a GPU host: pytest -m gpu)")
    return "cuda"


def test_cuda_graphs_replay_the_eager_step_exactly(cuda, demo_model_dir):
    """Graph replay runs the very kernels of the eager step: identical tokens, batched and padded."""
    from htrd.fastgen import FastGenerator

    kw = dict(device=cuda, prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512, max_new_tokens=NEW)
    graphs = FastGenerator.load(demo_model_dir, cuda_graphs=True, **kw)
    eager = FastGenerator.load(demo_model_dir, cuda_graphs=False, **kw)
    images = [stroke_line(1200, 160, 1), stroke_line(700, 120, 2), stroke_line(1200, 160, 3)]
    graphs.warmup(images[0], max_new_tokens=NEW)  # captures every (batch, span) graph, as before READY
    assert graphs.packed, "the start-up check turned packed prefills off (see the log)"
    a = graphs.generate([graphs.prepare(im) for im in images], min_new_tokens=NEW)
    b = eager.generate([eager.prepare(im) for im in images], min_new_tokens=NEW)
    assert graphs._graphs, "no CUDA graph was captured"
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert all(len(x.token_ids) == NEW for x in a)

    # a line joining a running batch midway gets the same tokens through the graphs
    from htrd.generation import Seq

    graphs.add([Seq(graphs.prepare(images[0]), NEW, NEW, tag=0)])
    done = graphs.step()
    graphs.add([Seq(graphs.prepare(images[1]), NEW, NEW, tag=1)])
    while graphs.running():
        done += graphs.step()
    assert {f.seq.tag: f.token_ids for f in done} == {0: b[0].token_ids, 1: b[1].token_ids}


def test_compiled_fast_path_starts_like_hf_generate(cuda, demo_model_dir, tmp_path):
    """bf16 + fused kernels: the first tokens equal HF generate's on the same merged weights."""
    from htrd.fastgen import FastGenerator, configure_compile_cache
    from htrd.model import load_model

    configure_compile_cache(tmp_path / "cc")
    model = load_model(demo_model_dir, device=cuda, dtype="bfloat16").model
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_model_dir, local_files_only=True)
    image = stroke_line(1200, 160, 4)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[image], return_tensors="pt").to(cuda)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    want = out[0, enc["input_ids"].shape[1] :].tolist()
    gen = FastGenerator(model, processor, prompt=PROMPT, batch_sizes=[1, 2], max_cache_len=512, max_new_tokens=NEW,
                        compile=True)
    gen.warmup(image, max_new_tokens=NEW)
    (got,) = gen.generate([gen.prepare(image)], min_new_tokens=NEW)
    same = next((i for i, (x, y) in enumerate(zip(got.token_ids, want)) if x != y), len(want))
    print(f"compiled fast path == HF generate for the first {same} of {NEW} tokens")
    assert same >= 4


def test_ops_compiled_beside_the_load_serve_the_warm_up(cuda, demo_model_dir, tmp_path):
    """precompile_ops (htrd compiles them in a thread while the weights load) compiles exactly the graphs the
    warm-up needs: the warm-up compiles no op again -- at most the vision tower's rotary -- and the decode
    steps and the prefills share them (8 graphs for the 4 ops, not 16)."""
    import json

    from htrd.fastgen import FastGenerator, configure_compile_cache, precompile_ops
    from htrd.model import load_model
    from torch._dynamo.utils import counters

    configure_compile_cache(tmp_path / "cc")
    torch._dynamo.reset()  # whatever earlier tests compiled
    counters.clear()
    text_config = json.loads((demo_model_dir / "config.json").read_text())["text_config"]
    assert precompile_ops(text_config, device=cuda, dtype_name="bfloat16") == 8
    assert counters["stats"]["unique_graphs"] == 8
    loaded = load_model(demo_model_dir, device=cuda, dtype="bfloat16")
    gen = FastGenerator(loaded.model, loaded.processor, prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512,
                        max_new_tokens=NEW, compile=True)
    gen.warmup(stroke_line(1200, 160, 8), max_new_tokens=NEW)
    gen.generate([gen.prepare(stroke_line(s * 300, 120, s)) for s in (1, 2, 3)], min_new_tokens=NEW)
    assert counters["stats"]["unique_graphs"] <= 9, dict(counters["recompiles"])


def test_the_vision_tower_passes_its_check_in_bf16_and_keeps_its_graphs(cuda, demo_model_dir):
    """In bf16 (what serves on a GPU) the warm-up's check of the vision tower against HF's forward passes:
    its own forward and the padded tower (prefill graphs) stay on. A patch embedding computed otherwise than
    HF's module (a GEMM here, HF's Conv3d there) differed by bf16 rounding and turned both off on the 8B model
    -- silently slower prefills -- until the GEMM was swapped into HF's module itself."""
    from htrd.fastgen import FastGenerator

    gen = FastGenerator.load(demo_model_dir, device=cuda, dtype="bfloat16", prompt=PROMPT, batch_sizes=[1, 2],
                             max_cache_len=512, max_new_tokens=NEW)
    assert gen.dtype == torch.bfloat16
    gen.warmup(stroke_line(1200, 160, 3), max_new_tokens=NEW)
    assert gen.vision.own and gen.vision.varlen, "the vision tower's check failed (see the log)"


def test_small_prefills_are_captured_and_replay_the_eager_prefill(cuda, demo_model_dir):
    """A small prefill is padded to PREFILL_BUCKET positions and its patches to a 256-row bucket; its two parts
    are captured on the first run (vision tower per padded rows, language model per (lines, padded
    width)) and replayed on the second, the whole prefill per exact shape is captured on the third and replayed
    from then on: the same tokens as the eager prefill (no graphs, no padding), alone and two lines together; a
    line of a new grid but the same padded width replays both parts' graphs with its own inputs. The padded
    vision tower (flash attention over variable-length blocks) passes its check against HF's forward."""
    from htrd.fastgen import PREFILL_BUCKET, FastGenerator, _round_up
    from htrd.model import prompt_layout

    kw = dict(device=cuda, prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512, max_new_tokens=NEW)
    gen = FastGenerator.load(demo_model_dir, cuda_graphs=True, **kw)
    eager = FastGenerator.load(demo_model_dir, cuda_graphs=False, **kw)
    gen.packed = eager.packed = False  # the left-padded prefill: GPUs without flash attention's varlen kernel
    sizes = [(1000, 140, 5), (640, 120, 6)]
    a, b = (gen.prepare(stroke_line(*s)) for s in sizes)
    assert gen.vision.varlen
    with torch.inference_mode():
        batch, layout = gen._collate([a, b]), prompt_layout([a, b], device=gen.device)
        assert gen.vision.check(batch["pixel_values"], batch["image_grid_thw"], layout.grids, layout.vision_lengths)
    assert gen.vision.varlen, "the padded vision tower differs from HF's forward"
    want = [x.token_ids for x in eager.generate([eager.prepare(stroke_line(*s)) for s in sizes], min_new_tokens=NEW)]
    runs = [gen.generate([a], min_new_tokens=NEW)[0].token_ids for _ in range(4)]
    # both parts captured; both replayed; whole captured; whole replayed
    assert gen.prefill_replays == 2 and len(gen._prefill_graphs) == 1 and len(gen._lm_graphs) == 1
    assert len(gen._vision_graphs) == 1 and gen.vision_replays == 1
    assert runs == [want[0]] * 4
    pair = [[x.token_ids for x in gen.generate([a, b], min_new_tokens=NEW)] for _ in range(4)]
    buckets = {gen.vision.rows_for(int(a.pixel_values.shape[0])),
               gen.vision.rows_for(int(a.pixel_values.shape[0] + b.pixel_values.shape[0]))}
    assert gen.prefill_replays == 4 and len(gen._lm_graphs) == 2 and len(gen._vision_graphs) == len(buckets)
    assert pair == [want] * 4
    width = _round_up(a.prompt_len, PREFILL_BUCKET)
    c_size = next((w, h, 7) for w in range(1000, 200, -32) for h in (140, 120, 100)
                  if (p := gen.prepare(stroke_line(w, h, 7))).image_grid_thw.tolist() != a.image_grid_thw.tolist()
                  and _round_up(p.prompt_len, PREFILL_BUCKET) == width
                  and gen.vision.rows_for(p.pixel_values.shape[0]) == gen.vision.rows_for(a.pixel_values.shape[0]))
    vision_replays = gen.vision_replays
    got = gen.generate([gen.prepare(stroke_line(*c_size))], min_new_tokens=NEW)[0].token_ids
    assert gen.prefill_replays == 5 and gen.vision_replays == vision_replays + 1  # both parts' graphs
    assert got == eager.generate([eager.prepare(stroke_line(*c_size))], min_new_tokens=NEW)[0].token_ids


def test_packed_prefill_graphs_replay_the_eager_packed_prefill(cuda, demo_model_dir):
    """Packed prefills (flash attention per line): one graph per padded token count, captured on its first
    prefill, replayed by later ones of any lines; the same tokens as the eager packed prefill, for one line,
    two, and six of different sizes. The first width runs eagerly, then is captured; the later new widths (and
    the vision tower's new row counts) are captured without an eager run and replayed for their first prefill
    (FastGenerator._record's direct capture) -- the same tokens either way. The generators checked flash
    attention over packed rows at start (packed on)."""
    from htrd.fastgen import FastGenerator, _pack_width

    kw = {"device": cuda, "prompt": PROMPT, "batch_sizes": [1, 2, 4, 8], "max_cache_len": 512, "max_new_tokens": NEW}
    gen = FastGenerator.load(demo_model_dir, cuda_graphs=True, **kw)
    eager = FastGenerator.load(demo_model_dir, cuda_graphs=False, **kw)
    assert gen.packed and eager.packed
    sizes = [(1200, 160, 1), (700, 120, 2), (300, 64, 3), (2000, 150, 4), (900, 100, 5), (1500, 140, 6)]
    for group in (sizes[:1], sizes[1:3], sizes):
        preps = [gen.prepare(stroke_line(*s)) for s in group]
        want = [x.token_ids for x in eager.generate([eager.prepare(stroke_line(*s)) for s in group],
                                                    min_new_tokens=NEW)]
        width = _pack_width(sum(p.prompt_len for p in preps))
        replays, seen = gen.prefill_replays, width in gen._packed_graphs
        for k in range(2):  # captured (unless an earlier group had this width), then replayed
            got = [x.token_ids for x in gen.generate(preps, min_new_tokens=NEW)]
            assert got == want, (group, k)
        assert width in gen._packed_graphs and gen.prefill_replays == replays + 1 + seen


def test_the_vision_attention_told_a_shorter_span_keeps_the_tokens(cuda, demo_model_dir, monkeypatch):
    """The padded vision tower's flash attention is told the longest image it may meet (VisionTower.span_for:
    VISION_SPAN patches), not the padded row count. Lowered here (with the row bucket) so that the demo's
    lines, of 52-88 patches, cross it: prefills whose images all fit replay a graph told the span; one with a
    longer image a graph of its own, told the rows -- each captured on its first prefill and replayed on the
    next, the eager generator's tokens every time."""
    from htrd import vision
    from htrd.fastgen import FastGenerator

    monkeypatch.setattr(vision, "VISION_SPAN", 80)
    monkeypatch.setattr(vision, "ROW_BUCKET", 64)  # the padding image stays within the span
    kw = {"device": cuda, "prompt": PROMPT, "batch_sizes": [1, 2, 4, 8], "max_cache_len": 512, "max_new_tokens": NEW}
    gen = FastGenerator.load(demo_model_dir, cuda_graphs=True, **kw)
    eager = FastGenerator.load(demo_model_dir, cuda_graphs=False, **kw)
    assert gen.packed and gen.vision.varlen
    fit = [(300, 64, 3), (500, 100, 5), (1200, 160, 1), (2000, 150, 4)]  # 72, 80, 52, 68 patches
    long = [(700, 120, 2), (300, 64, 3), (500, 100, 5)]  # 88, 72, 80
    for k, group in enumerate((fit, long, fit, long)):
        preps = [gen.prepare(stroke_line(*s)) for s in group]
        lengths = [int(p.pixel_values.shape[0]) for p in preps]
        rows = gen.vision.rows_for(sum(lengths))
        assert (max(lengths) > 80) == (group is long) and rows > 80, (lengths, rows)
        span = rows if group is long else 80
        assert gen.vision.span_for(rows, lengths) == span
        want = [x.token_ids for x in eager.generate([eager.prepare(stroke_line(*s)) for s in group],
                                                    min_new_tokens=NEW)]
        graphs, replays = len(gen._vision_graphs), gen.vision_replays
        assert [x.token_ids for x in gen.generate(preps, min_new_tokens=NEW)] == want, group
        assert (rows, span) in gen._vision_graphs
        # captured on the first of each (nothing replayed), replayed on the second (nothing captured)
        assert (len(gen._vision_graphs), gen.vision_replays) == ((graphs + 1, replays) if k < 2 else (graphs, replays + 1))


def test_precaptured_prefill_graphs_replay_the_eager_packed_prefill(cuda, demo_model_dir):
    """After the warm-up, precapture_next captures every packed width and vision row count ahead of need (on
    stand-in inputs, without running anything); a later prefill of lines of new sizes then captures nothing
    and replays those graphs with its own inputs -- the eager generator's tokens."""
    from htrd.fastgen import FastGenerator, _pack_width

    kw = {"device": cuda, "prompt": PROMPT, "batch_sizes": [1, 2, 4, 8], "max_cache_len": 512, "max_new_tokens": NEW}
    gen = FastGenerator.load(demo_model_dir, cuda_graphs=True, prefill_chunk=8, **kw)
    eager = FastGenerator.load(demo_model_dir, cuda_graphs=False, **kw)
    gen.warmup(stroke_line(1200, 160, 1), max_new_tokens=NEW)
    while gen.precapture_next():
        pass
    assert gen.precaptured > 10 and gen.direct_capture_failures == 0 and gen._prefill_graphs_ok
    graphs = (len(gen._packed_graphs), len(gen._vision_graphs))
    sizes = [(700, 120, 2), (300, 64, 3), (2000, 150, 4), (900, 100, 5), (1500, 140, 6)]
    preps = [gen.prepare(stroke_line(*s)) for s in sizes]
    assert _pack_width(sum(p.prompt_len for p in preps)) in gen._packed_graphs
    want = [x.token_ids for x in eager.generate([eager.prepare(stroke_line(*s)) for s in sizes], min_new_tokens=NEW)]
    replays = gen.prefill_replays
    assert [x.token_ids for x in gen.generate(preps, min_new_tokens=NEW)] == want
    assert (len(gen._packed_graphs), len(gen._vision_graphs)) == graphs and gen.prefill_replays == replays + 1


def test_a_prefill_launched_behind_decode_steps_never_waits_for_the_gpu(cuda, demo_model_dir):
    """step(during=...) overlaps a newcomer's prefill with the launched decode steps only if nothing in the
    prefill waits for the GPU: under torch's sync debug mode set to "error", adding a line of a new image size
    (new grid inputs, both parts of the prefill captured without an eager run -- a first sighting after the
    warm-up's graphs -- and replayed) while another
    line decodes raises on any blocking copy, .item() or synchronize. Both lines still get the eager generator's tokens."""
    from htrd.fastgen import FastGenerator
    from htrd.generation import Seq

    kw = dict(device=cuda, prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512, max_new_tokens=NEW)
    gen = FastGenerator.load(demo_model_dir, cuda_graphs=True, **kw)
    eager = FastGenerator.load(demo_model_dir, cuda_graphs=False, **kw)
    sizes = [(1200, 160, 8), (760, 110, 9)]
    gen.warmup(stroke_line(*sizes[0]), max_new_tokens=NEW)
    want = [eager.generate([eager.prepare(stroke_line(*s))], min_new_tokens=NEW)[0].token_ids for s in sizes]
    newcomer = gen.prepare(stroke_line(*sizes[1]))  # preprocessing is the CPU pool's, not the inference thread's
    gen.add([Seq(gen.prepare(stroke_line(*sizes[0])), NEW, NEW, tag=0)])
    calls = []

    def join():
        if not calls:
            with warnings.catch_warnings():  # "a prototype feature" (a UserWarning, an error under pytest here)
                warnings.simplefilter("ignore", UserWarning)
                torch.cuda.set_sync_debug_mode("error")
            try:
                gen.add([Seq(newcomer, NEW, NEW, tag=1)])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        calls.append(1)

    done = {}
    while gen.running():
        done.update({f.seq.tag: f.token_ids for f in gen.step(during=join)})
    assert done == {0: want[0], 1: want[1]}


@pytest.mark.parametrize("kind", ["triton", "flash"])
def test_decode_attention_reads_each_slot_s_own_keys_as_the_masked_span_does(cuda, demo_model_dir, kind):
    """Triton's and flash attention's decode kernels over each (slot, KV head)'s own keys (htrd.attention:
    offsets kv_first, lengths to pos; Triton split and not) give SDPA's attention over the masked span, on the
    live cache of lines prefilled together with left padding, one joined later and one freed; the generator
    checked each at start. The steps run through SDPA here, which keeps its mask current (decode steps over
    each line's own keys do not update it)."""
    from htrd.attention import flash_decode, kv_rows, kv_spans, sdpa_decode, triton_decode
    from htrd.fastgen import FastGenerator
    from htrd.generation import Seq

    gen = FastGenerator.load(demo_model_dir, device=cuda, prompt=PROMPT, batch_sizes=[1, 2, 4], max_cache_len=512,
                             max_new_tokens=NEW, cuda_graphs=False, decode_attention=kind)
    assert gen.decode_attention == kind, f"{kind} decode attention is off (see the log) on a GPU that has it"
    gen.decode_attention = "sdpa"  # steps through SDPA keep the mask (`attend`) current: the reference below
    gen.packed = False  # left-padded prefills: lines start at different positions
    preps = [gen.prepare(stroke_line(*s)) for s in [(1200, 160, 11), (500, 100, 12), (900, 130, 13)]]
    gen.add([Seq(preps[0], NEW, tag=0), Seq(preps[1], 2, tag=1)])
    gen.step(steps=2)
    gen.add([Seq(preps[2], NEW, tag=2)])
    gen.step(steps=3)
    B, L, g, hd = 4, 512, gen.n_heads // gen.n_kv, gen.head_dim
    with torch.inference_mode():
        first, pos = gen.kv_first[:B], gen.pos[:B]
        assert len(set(first.tolist())) > 1
        rows = kv_rows(gen.rows[:B], gen.kv_heads, pos, gen.max_cache_len)
        cu_k, used = kv_spans(rows, first, pos, gen.max_cache_len)
        seen = gen.attend[:B, :L].clone()
        seen[torch.arange(B, device=gen.device), pos] = True  # what the step adds before attending
        bias = torch.zeros((B, 1, 1, L), device=gen.device).masked_fill_(~seen[:, None, None], float("-inf"))
        q = torch.randn((B, gen.n_kv, g, hd), device=gen.device, dtype=gen.dtype)
        for li in (0, len(gen.layers) - 1):
            k, v = gen.k_cache[li], gen.v_cache[li]
            want = sdpa_decode(q.float(), k.float(), v.float(), scale=hd**-0.5, bias=bias, span=L)
            if kind == "flash":
                got = [flash_decode(q, k, v, scale=hd**-0.5, cu_q=gen.cu_q[: B * gen.n_kv + 1], cu_k=cu_k,
                                    used=used, span=L)]
            else:
                got = [triton_decode(q.reshape(-1, g, hd), k.view(-1, hd), v.view(-1, hd), scale=hd**-0.5,
                                     start=cu_k[:-1], used=used, splits=splits) for splits in (1, 4)]
            for out in got:
                assert (out.view(want.shape).float() - want).norm() <= 0.01 * want.norm()


def test_mixed_step_graphs_replay_the_eager_mixed_steps_and_pass_their_check(cuda, demo_model_dir):
    """Mixed steps on a GPU (flash attention over the cache, prompt chunks aligned bottom-right): the start-up
    check passes (mixed on), the warm-up captures a graph per (decode bucket, budget), and with a small budget
    (prompts spanning steps, lines joining while others decode) the captured steps give the eager mixed
    steps' tokens."""
    from htrd.fastgen import FastGenerator
    from htrd.generation import Seq

    kw = dict(device=cuda, prompt=PROMPT, batch_sizes=[1, 2, 4, 8], max_cache_len=512, max_new_tokens=NEW,
              mixed=True, prefill_tokens=32)
    gen = FastGenerator.load(demo_model_dir, cuda_graphs=True, **kw)
    eager = FastGenerator.load(demo_model_dir, cuda_graphs=False, **kw)
    assert gen.mixed and eager.mixed, "the start-up check turned mixed steps off (see the log)"
    gen.warmup(stroke_line(1200, 160, 1), max_new_tokens=NEW)
    assert len(gen._mixed_graphs) == len(gen.batch_sizes) * len(gen.prefill_budgets)
    sizes = [(1200, 160, 1), (700, 120, 2), (300, 64, 3), (2000, 150, 4), (900, 100, 5)]

    def run(g):
        preps = [g.prepare(stroke_line(*s)) for s in sizes]
        g.add([Seq(preps[0], NEW, NEW, tag=0)])
        done = g.step(steps=2)
        g.add([Seq(p, NEW, NEW, tag=i) for i, p in enumerate(preps[1:], 1)])
        while g.running():
            done += g.step()
        return {f.seq.tag: f.token_ids for f in done}

    assert run(gen) == run(eager)
