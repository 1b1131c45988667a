"""htrctl: deploy, check and use a handwritten-text-recognition service.

This package never imports torch at module level: ``htrctl --help`` and the
client must start fast on machines without the ``model`` extra.
"""

__version__ = "0.1.0"
