"""htrd.activation on the CPU: the Triton SiLU(gate) x up kernel run by Triton's interpreter against PyTorch,
its start-up check, and the fast generator decoding with it. On a GPU the compiled kernel is checked at every
start-up (silu_mul_ok) and by tests/test_fastgen_gpu.py (captured steps and prefills equal eager ones).

Like tests/test_attention.py, each interpreter test runs in a Python of its own (the interpreter must be chosen
before Triton's first import)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from helpers import stroke_line
from test_attention import NEW, PROMPT, batched_and_joining, interpreted_in


def _run(name: str, *args) -> None:
    interpreted_in("test_activation", name, *args)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_silu_mul_equals_pytorch_on_ragged_and_strided_rows(dtype):
    """Widths that are not a multiple of the kernel's block (the last block masked), one row, many rows, rows
    taken from a wider tensor (a row stride past the width), none at all."""
    _run("silu_mul_equals_pytorch", dtype)


def _silu_mul_equals_pytorch(dtype: str) -> None:
    from htrd import activation as a

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    for rows, inter in [(1, 8), (3, 1000), (37, 2500), (5, 1024)]:
        gu = (torch.randn((rows, 2 * inter), generator=gen) * 4).to(dt)
        g, u = gu.float().chunk(2, dim=-1)
        want = torch.nn.functional.silu(g) * u
        got = a.silu_mul(gu)
        assert got.shape == (rows, inter) and got.dtype == dt
        tol = 1e-5 if dt == torch.float32 else 2e-3
        assert torch.allclose(got.float(), want, rtol=tol, atol=tol), (rows, inter)
        wide = torch.zeros((rows, 2 * inter + 64), dtype=dt)
        wide[:, : 2 * inter] = gu
        assert torch.equal(a.silu_mul(wide[:, : 2 * inter]), got)
    assert a.silu_mul(torch.zeros((0, 16), dtype=dt)).shape == (0, 8)


def test_the_start_up_check_passes_the_kernel_and_catches_a_wrong_one():
    _run("check")


def _check() -> None:
    from htrd import activation as a
    from htrd import attention

    assert a.silu_mul_ok(inter=1000, device="cpu", dtype=torch.float32)
    real = a.silu_mul
    a.silu_mul = lambda gu: real(gu).roll(1, dims=1)  # a column off
    warned = []
    attention.logger.warning = lambda msg, *args: warned.append(msg % args)  # kernel_agrees logs it
    assert not a.silu_mul_ok(inter=1000, device="cpu", dtype=torch.float32)
    assert "differs from PyTorch's" in warned[0], warned


def test_without_the_interpreter_the_cpu_keeps_the_compiled_op(monkeypatch):
    from htrd import activation

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not activation.silu_mul_ok(inter=64, device="cpu", dtype=torch.float32)


def test_the_fast_generator_with_the_triton_activation_decodes_the_tokens_of_pytorch(demo_model_dir):
    """fp32 on the demo model: the MLP's activation through the Triton kernel (prefills and decode steps)
    chooses the tokens PyTorch's op chooses (itself checked against HF generate in test_fastgen), for lines
    alone, batched, and one joining while another decodes."""
    _run("generator", str(demo_model_dir))


def _generator(demo_model_dir: str) -> None:
    from htrd import fastgen
    from htrd.fastgen import FastGenerator
    kw = {"device": "cpu", "prompt": PROMPT, "batch_sizes": [1, 2, 4], "max_cache_len": 512, "max_new_tokens": NEW,
          "decode_attention": "sdpa"}
    tri = FastGenerator.load(demo_model_dir, **kw)
    fastgen.silu_mul_ok = lambda **_: False
    ref = FastGenerator.load(demo_model_dir, **kw)
    assert (tri.mlp_activation, ref.mlp_activation) == ("triton", "eager")
    preps = [tri.prepare(stroke_line(*s)) for s in [(1200, 160, 11), (500, 100, 12), (900, 130, 13)]]
    for gen in (tri, ref):
        gen.got, gen.joined = batched_and_joining(gen, preps)
    assert tri.got == ref.got and all(len(t) == NEW for t in tri.got)
    assert tri.joined == ref.joined and len(tri.joined[1]) == 5
