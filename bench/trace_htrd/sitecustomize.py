"""A torch.profiler timeline of htrd under load: where the GPU idles, by what the inference thread was doing.

Not part of htrd: put this folder first on PYTHONPATH of bench_serving.py (which passes its environment to
the daemons it starts) and set HTR_TRACE_OUT; each htrd it starts then records, in every load (its first decode
step after more than a second without one), a timeline from HTR_TRACE_DELAY_S (default 2) for
HTR_TRACE_S seconds (default 1.5) -- CUDA kernels and the CPU ops of the inference thread, with
``htr:<method>`` ranges around the engine's and the generator's phases -- and writes it as a Chrome trace,
HTR_TRACE_OUT/trace-<pid>-<n>.json (~35 MB a second under 64 clients on an H200). Then:

    PYTHONPATH=bench/trace_htrd:$PYTHONPATH HTR_TRACE_OUT=/tmp/tr HTR_TRACE_S=6 HTR_TRACE_DELAY_S=0.2 \\
        python bench/bench_serving.py --model-dir /srv/m8b --engines continuous --clients 64 --per-client 6
    python bench/trace_summary.py /tmp/tr/trace-*.json

The profiler adds a few microseconds to every eager op (host-bound phases look slower than they are) and
writing the trace pauses the load it ends; read the figures of a traced run for where, not how fast.
"""

import os
import sys
import threading
import time

OUT = os.environ.get("HTR_TRACE_OUT")
# Engine and FastGenerator methods wrapped in htr:<name> ranges; _prefill and _prompt_last also carry the
# number of lines (htr:_prefill:<n>), _step the slots occupied.
ENGINE = ("_take", "_finish", "_admit")
GENERATOR = ("_results_ready", "_reset_slots", "_results", "_record", "_vision_replayed", "_packed_layers",
             "_generate_eager", "_join", "_stage_group", "_launch_mixed", "_mixed_host")


def _install() -> None:
    while "htrd.engine" not in sys.modules or "htrd.fastgen" not in sys.modules:
        time.sleep(0.05)
    time.sleep(0.5)  # both modules fully imported
    import torch
    from htrd import engine, fastgen

    ranged = torch.profiler.record_function

    def wrap(cls, name, label=None):
        inner = getattr(cls, name)

        def wrapper(*args, **kwargs):
            tag = f"htr:{name}" if label is None else f"htr:{name}:{label(*args, **kwargs)}"
            with ranged(tag):
                return inner(*args, **kwargs)

        setattr(cls, name, wrapper)

    for name in ENGINE:
        wrap(engine.Engine, name)
    for name in GENERATOR:
        wrap(fastgen.FastGenerator, name)
    wrap(fastgen.FastGenerator, "_prefill", lambda self, seqs: len(seqs))
    wrap(fastgen.FastGenerator, "_prompt_last", lambda self, batch, layout, st: int(st.shape[0]))
    delay = float(os.environ.get("HTR_TRACE_DELAY_S", "2"))
    length = float(os.environ.get("HTR_TRACE_S", "1.5"))
    state = {"last": 0.0, "load": 0.0, "prof": None, "since": 0.0, "n": 0, "traced_load": -1.0}
    step = engine.Engine._step

    def traced_step(self):  # on the inference thread: the profiler starts and stops there
        now = time.monotonic()
        if now - state["last"] > 1.0:
            state["load"] = now
        state["last"] = now
        prof = state["prof"]
        if prof is None and state["traced_load"] != state["load"] and now - state["load"] > delay:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
            state["prof"], state["since"] = prof, now
        with ranged(f"htr:_step:{self.gen.occupancy()}"):
            step(self)
        if prof is not None and time.monotonic() - state["since"] > length:
            prof.__exit__(None, None, None)
            state["n"] += 1
            prof.export_chrome_trace(os.path.join(OUT, f"trace-{os.getpid()}-{state['n']}.json"))
            state["prof"], state["traced_load"] = None, state["load"]
            state["last"] = time.monotonic()

    engine.Engine._step = traced_step


if OUT and os.environ.get("HTR_CONFIG"):  # htrd processes only (bench_serving sets HTR_CONFIG for them)
    os.makedirs(OUT, exist_ok=True)
    threading.Thread(target=_install, name="htr-trace", daemon=True).start()
