"""The daemon object: everything one running htrd owns, built in ``main()`` and injected.

(Named apart from "service", which in this project means the systemd units and doctor's checks of them.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from htrctl import __version__

from .engine import Engine
from .faults import Faults
from .metrics import Metrics
from .state import ServiceState


@dataclass
class Daemon:
    settings: Any  # htrctl.config.Settings
    state: ServiceState
    metrics: Metrics
    engine: Engine
    faults: Faults
    gpu: Any = None  # htrctl.gpus.GpuDevice, None on CPU
    manifest_digest: str | None = None
    version: str = __version__
    pid: int = field(default_factory=os.getpid)
