"""Files shipped inside the package, read through :mod:`importlib.resources`.

``htrctl/data/systemd`` and ``htrctl/data/htr.yaml`` are symbolic links to the
top-level ``systemd/`` and ``configs/htr.yaml`` of the source tree: those stay
the one source of truth (tests, reviews and the README point there), and a
wheel or sdist carries them as plain files, so ``pip install htrctl`` can
install the service and print the documented config without a source tree.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from .errors import HtrError

CONFIG_TEMPLATE = "htr.yaml"
UNIT_DIR = "systemd"


def _data() -> Any:  # a Traversable (importlib.resources.abc from 3.11 on)
    return resources.files("htrctl").joinpath("data")


def _read(node: Any, what: str) -> str:
    try:
        return node.read_text(encoding="utf-8")
    except (OSError, FileNotFoundError) as exc:
        raise HtrError(
            f"{what} is missing from this htrctl installation ({node})",
            remedy="reinstall htrctl: pip install --force-reinstall 'htrctl[daemon]'",
        ) from exc


def config_template() -> str:
    """The documented config: every setting with its default (``htrctl config template``)."""
    return _read(_data().joinpath(CONFIG_TEMPLATE), "the config template htr.yaml")


def unit_template(name: str) -> str:
    """The text of one file of ``systemd/``: a unit template (``htr.service``, ``htr@.socket``...) or the
    GPU-preparing script ``htr-gpu-prepare.sh``."""
    return _read(_data().joinpath(UNIT_DIR, name), f"the unit template {name}")
