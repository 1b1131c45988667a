"""htrd's systemd units: rendered for this installation, installed, queried.

- :mod:`.render` -- the unit names and templates (``systemd/``, shipped as
  ``htrctl/data/systemd``) filled with this installation's paths, user, groups
  and bind mounts;
- :mod:`.installer` -- ``htrctl service install|uninstall``: the account, the
  config, the unit files and the GPU-preparing script, idempotently;
- :mod:`.control` -- ``htrctl service status|logs|restart``.

Every question to systemd goes through :mod:`htrctl.systemd`. (Doctor's checks of
the running daemon are :mod:`htrctl.doctor.daemon`; the daemon's own state holder
is in ``htrd``.)

The package imports nothing itself: ``htrctl --help`` and the client, which read
the unit names from :mod:`.render`, do not load the config machinery.
"""

