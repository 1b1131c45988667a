"""htrd: the inference daemon (installed as the ``htrd`` package from ``daemon/``).

Owns everything that imports torch. The model lives on the daemon object
(:class:`htrd.runtime.Daemon`) built in ``main()``, never at import time.
"""

from htrctl import __version__

__all__ = ["__version__"]
