"""An experiment hook, not part of htrd: put this folder first on PYTHONPATH of bench_serving.py (which passes its
environment to the daemons it starts) and set HTR_SWITCH_INTERVAL (seconds); each htrd it starts then runs with
that ``sys.setswitchinterval`` -- how long a thread that wants the GIL waits, at most, for the thread holding it
to hand it over (CPython's default 0.005). Compares htrd's inference thread, which hands the GIL over at every
blocking CUDA call, under its preprocessing threads' load:

    PYTHONPATH=bench/gil_probe:$PYTHONPATH HTR_SWITCH_INTERVAL=0.0005 python bench/bench_serving.py ...
"""

import os
import sys

if os.environ.get("HTR_CONFIG") and os.environ.get("HTR_SWITCH_INTERVAL"):  # htrd processes only
    sys.setswitchinterval(float(os.environ["HTR_SWITCH_INTERVAL"]))
