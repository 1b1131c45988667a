"""``python -m htrd`` = the ``htrd`` console script."""

from .app import main

if __name__ == "__main__":  # not when a preprocessing worker process imports the parent's main module
    main()
