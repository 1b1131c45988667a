"""htrd.attention on the CPU: the Triton decode kernel run by Triton's interpreter (``TRITON_INTERPRET=1``: the
kernel's own code, its loops, masks and split combination, executed with NumPy) against SDPA over the masked
span, the start-up check that guards it, and the fast generator decoding with it. On a GPU the compiled kernel
is checked by tests/test_fastgen_gpu.py and at every start-up (kernel_agrees).

The interpreter must be chosen before Triton is first imported (its own library functions are decorated at
import), so each of those tests runs in a Python of its own: :func:`interpreted` runs a test function of this
file there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from helpers import stroke_line

PROMPT = "Transcribe the handwritten text in this line image."
NEW = 8
HERE = Path(__file__).resolve().parent


def interpreted(name: str, *args) -> None:
    """Run ``_name(*args)`` of this file in a new Python with Triton's interpreter on; its assertion errors
    fail the calling test with the child's traceback."""
    interpreted_in("test_attention", name, *args)


def interpreted_in(module: str, name: str, *args) -> None:
    """Run ``_name(*args)`` of the test file *module* in a new Python with Triton's interpreter on."""
    code = (f"import sys; sys.path[:0] = [{str(HERE)!r}]; import {module} as t; "
            f"t._{name}(*{json.dumps(list(args))})")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]


def batched_and_joining(gen, preps) -> tuple[list[list[int]], dict[int, list[int]]]:
    """What fast generator *gen* decodes for *preps*: all of them batched (NEW tokens each), and the first
    decoding alone (NEW) while the second joins after 3 steps (5 tokens) -- (batched tokens, {line: tokens})."""
    from htrd.generation import Seq

    got = [f.token_ids for f in gen.generate(preps, min_new_tokens=NEW)]
    gen.add([Seq(preps[0], NEW, NEW, tag=0)])
    gen.step(steps=3)
    gen.add([Seq(preps[1], 5, 5, tag=1)])
    joined = {}
    while gen.running():
        joined.update({f.seq.tag: f.token_ids for f in gen.step()})
    return got, joined


def _cache(S: int, nkv: int, g: int, hd: int, M: int, dtype):
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn((S, nkv, M, hd), generator=gen).to(dtype) for _ in range(2))
    q = torch.randn((S, nkv, g, hd), generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize(("dtype", "g", "hd"), [("float32", 4, 32), ("float16", 4, 32), ("float32", 1, 64),
                                                ("float32", 8, 16)])
def test_triton_decode_equals_sdpa_over_the_masked_span_split_or_not(dtype, g, hd):
    """Slots whose keys start past position 0 (left padding), a slot with one key, one with the whole span, and
    keys that end mid-block: every split count and block size gives SDPA's output, including splits with no
    keys at all (a one-key slot split 8 ways); 4 query heads a KV head (the 8B model), 1 (no GQA) and 8."""
    interpreted("decode_equals_sdpa", dtype, g, hd)


def _decode_equals_sdpa(dtype: str, g: int, hd: int) -> None:
    from htrd import attention as a

    dtype = getattr(torch, dtype)
    S, nkv, M = 5, 2, 256
    q, k, v = _cache(S, nkv, g, hd, M, dtype)
    first = torch.tensor([0, 3, 0, 100, 7])
    pos = torch.tensor([0, 200, M - 1, 150, 70])
    seen = torch.arange(M)
    seen = (seen[None] >= first[:, None]) & (seen[None] <= pos[:, None])
    bias = torch.zeros((S, 1, 1, M)).masked_fill_(~seen[:, None, None], float("-inf"))
    want = a.sdpa_decode(q.float(), k.float(), v.float(), scale=hd**-0.5, bias=bias, span=M).reshape(S, -1)
    rows = a.kv_rows(torch.arange(S), torch.arange(nkv), pos, M)
    cu_k, used = a.kv_spans(rows, first, pos, M)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for splits, block_n in ((1, 64), (2, 64), (3, 32), (8, 64), (1, 128)):
        got = a.triton_decode(q.reshape(S * nkv, g, hd), k.view(-1, hd), v.view(-1, hd), scale=hd**-0.5,
                              start=cu_k[:-1], used=used, splits=splits, block_n=block_n).reshape(S, -1)
        assert got.dtype == dtype
        assert (got.float() - want).abs().max() <= tol * want.abs().max(), (splits, block_n)


def test_the_start_up_check_passes_the_kernel_and_catches_a_wrong_one():
    interpreted("check")


def _check() -> None:
    from htrd import attention as a

    assert a.triton_decode_ok(n_kv=2, g=4, head_dim=32, device="cpu", dtype=torch.float32, span=128)
    assert not a.triton_decode_ok(n_kv=2, g=4, head_dim=24, device="cpu", dtype=torch.float32, span=128)  # not 2^k
    real = a.triton_decode

    def one_key_short(q, k, v, *, used, **kw):  # reads a line's keys but its last
        return real(q, k, v, used=(used - 1).clamp(min=1), **kw)

    a.triton_decode = one_key_short
    warned = []
    a.logger.warning = lambda msg, *args: warned.append(msg % args)
    assert not a.triton_decode_ok(n_kv=2, g=4, head_dim=32, device="cpu", dtype=torch.float32, span=128)
    assert "differs from SDPA" in warned[0], warned


def test_without_the_interpreter_the_cpu_has_no_triton_decode(monkeypatch):
    from htrd import attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not attention.has_triton("cpu", torch.float32)
    assert not attention.triton_decode_ok(n_kv=2, g=4, head_dim=32, device="cpu", dtype=torch.float32, span=128)


def test_splits_only_where_the_lines_leave_sms_idle():
    from htrd.attention import decode_splits

    assert decode_splits(128 * 8, 132) == decode_splits(16 * 8, 132) == decode_splits(66, 132) == 1
    assert decode_splits(8, 132) == 4  # one line's 8 KV heads: at most 4 parts each
    assert decode_splits(40, 132) == 4
    assert decode_splits(60, 132) == 3
    assert decode_splits(0, 132) == 4


def test_the_fast_generator_decodes_with_triton_the_tokens_of_sdpa(demo_model_dir):
    """fp32 on the demo model: decode steps through the Triton kernel choose the tokens the SDPA steps choose
    (themselves checked against HF generate in test_fastgen), for lines alone, batched, and one joining while
    another decodes; a kernel named in the config that cannot run falls back with a warning."""
    interpreted("generator", str(demo_model_dir))


def _generator(demo_model_dir: str) -> None:
    from htrd import fastgen
    from htrd.fastgen import FastGenerator
    kw = {"device": "cpu", "prompt": PROMPT, "batch_sizes": [1, 2, 4], "max_cache_len": 512, "max_new_tokens": NEW}
    tri = FastGenerator.load(demo_model_dir, **kw)  # auto: Triton runs here (the interpreter) and passes
    ref = FastGenerator.load(demo_model_dir, decode_attention="sdpa", **kw)
    assert (tri.decode_attention, ref.decode_attention) == ("triton", "sdpa")
    preps = [tri.prepare(stroke_line(*s)) for s in [(1200, 160, 11), (500, 100, 12), (900, 130, 13)]]
    for gen in (tri, ref):
        gen.got, gen.joined = batched_and_joining(gen, preps)
    assert tri.got == ref.got and all(len(t) == NEW for t in tri.got)
    assert tri.joined == ref.joined and len(tri.joined[1]) == 5
    warned = []
    fastgen.logger.warning = lambda msg, *args: warned.append(msg % args)
    flash = FastGenerator.load(demo_model_dir, decode_attention="flash", **kw)
    assert flash.decode_attention == "triton"  # no flash attention on the CPU: the next that runs
    assert "decode attention flash does not run here: triton instead" in warned, warned
    with pytest.raises(ValueError, match="one of auto, triton, flash, sdpa"):
        FastGenerator.load(demo_model_dir, decode_attention="fast", **kw)
