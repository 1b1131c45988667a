"""The daemon object: everything one running htrd owns, built in ``main()`` and injected.

(Named apart from "service", which in this project means the systemd units and doctor's checks of them.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from htrctl import __version__

from .budget import PixelBudget, PixelLimits, resolve_limits
from .engine import Engine
from .faults import Faults
from .metrics import Metrics
from .state import DaemonState


@dataclass
class Daemon:
    settings: Any  # htrctl.config.Settings
    state: DaemonState
    metrics: Metrics
    engine: Engine
    faults: Faults
    gpu: Any = None  # htrctl.gpus.GpuDevice, None on CPU
    manifest_digest: str | None = None
    version: str = __version__
    pid: int = field(default_factory=os.getpid)
    # What decoded images may hold (htrd.budget): per image, per request, and the daemon-wide budget in flight.
    pixel_limits: PixelLimits = field(init=False)
    pixel_budget: PixelBudget = field(init=False)

    def __post_init__(self) -> None:
        self.pixel_limits = resolve_limits(self.settings.limits)
        self.pixel_budget = PixelBudget(self.pixel_limits.in_flight_pixels,
                                        on_change=self.metrics.pixels_in_flight.set)
        for scope, value in (("image", self.pixel_limits.image_pixels), ("request", self.pixel_limits.request_pixels),
                             ("in_flight", self.pixel_limits.in_flight_pixels)):
            self.metrics.pixel_limit.labels(scope).set(value)
