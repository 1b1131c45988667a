"""``python -m htrd`` = the ``htrd`` console script."""

from .app import main

main()
