"""The installed package deploys itself (issue 15, row 1): no source tree needed.

Builds the wheel, installs it into a fresh virtual environment with the
README's own install line (`pip install 'htrctl[daemon]'`), then runs the
README's "try it where it is installed" lines from a directory outside the
source tree: `htrctl demo`, `htrctl service install --root`, `htrctl config
template`. Offline: pip finds htrctl in the wheel directory (PIP_NO_INDEX,
PIP_FIND_LINKS) and its dependencies already installed -- a view of this
test environment's site-packages without htrctl itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import REPO

INSTALL_SECTION = "## Install on a GPU server"


def readme_lines() -> tuple[str, list[str]]:
    """(the daemon install line, the try-it lines) from the README's install section, comments stripped."""
    text = (REPO / "README.md").read_text()
    section = text.split(INSTALL_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    lines = [[ln.split("  #")[0].strip() for ln in b.splitlines() if ln.strip()] for b in blocks]
    install = [ln for ln in lines[0] if "'htrctl[daemon]'" in ln]
    assert len(install) == 1 and len(lines) >= 2, section
    return install[0], lines[1]


def _deps_view(dest: Path) -> Path:
    """This environment's installed packages, htrctl/htrd and .pth hooks left out (symlinks)."""
    sites = [Path(sysconfig.get_paths()["purelib"])]
    sites += [Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]  # .pth-added ones too
    dest.mkdir()
    for site in dict.fromkeys(sites):
        for entry in site.iterdir():
            name = entry.name.lower()
            if (name.startswith(("htrctl", "htrd", "__editable__", "pip"))
                    or name.endswith((".pth", ".egg-link")) or (dest / entry.name).exists()):
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


def _base_python() -> str:
    """`python3` of the README: the interpreter this environment was made from (same ABI as the deps)."""
    exe = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(exe if exe.exists() else Path(sys.base_prefix) / "bin" / "python3")


@pytest.mark.slow
def test_wheel_installs_and_deploys_without_the_source_tree(tmp_path, demo_model_dir):
    from htrctl.demo import _link_tree

    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = dist.glob("htrctl-*.whl")

    venv, root, home = tmp_path / "opt-htr", tmp_path / "htr-root", tmp_path / "home"
    home.mkdir()
    py = _base_python()
    # The venv first, so the dependencies can be made visible before the README's line installs into it.
    made = subprocess.run([py, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    site = Path(subprocess.check_output([str(venv / "bin/python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    for old in site.glob("setuptools*"):  # Python < 3.12 seeds an old one; the dependencies' (torch needs >= 77) win
        shutil.rmtree(old)
    (site / "htr-test-deps.pth").write_text(str(_deps_view(tmp_path / "deps")) + "\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HTR_", "PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(dist),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    # The demo model build is tested elsewhere: seed its cache (the demo checks and reuses it).
    _link_tree(demo_model_dir, home / ".cache" / "htrctl" / "demo" / "demo-model")

    def sh(line: str, timeout: float = 600) -> subprocess.CompletedProcess:
        line = line.replace("/opt/htr", str(venv)).replace("/tmp/htr-root", str(root))
        line = re.sub(r"^python3 ", py + " ", line)
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=timeout,
                              cwd=home, env=env)

    install, tries = readme_lines()
    r = sh(install)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    where = subprocess.run([str(venv / "bin/python"), "-c", "import htrctl, htrd; print(htrctl.__file__, htrd.__file__)"],
                           capture_output=True, text=True, cwd=home, env=env)
    assert where.returncode == 0, where.stderr
    for f in where.stdout.split():
        assert Path(f).is_relative_to(site), f"{f} is not the installed wheel's"  # not the source tree
    assert not (site / "htrctl" / "data" / "systemd").is_symlink()  # the templates themselves, not a link

    ran = {}
    for line in tries:
        r = sh(line)
        assert r.returncode == 0, f"{line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        ran[line.split()[1]] = r
    assert set(ran) == {"demo", "service", "config"}
    assert "[7/7]" in ran["demo"].stderr + ran["demo"].stdout
    units = root / "etc/systemd/system"
    from htrctl.units.render import PREPARE_SCRIPT, UNITS

    assert sorted(p.name for p in units.iterdir()) == sorted(UNITS)
    assert (root / PREPARE_SCRIPT.relative_to("/")).read_text().startswith("#!/bin/sh\n# Rendered by htrctl")
    assert f"ExecStart={venv}/bin/htrd --config /etc/htr/htr.yaml" in (units / "htr.service").read_text()
    shipped = (REPO / "configs" / "htr.yaml").read_text()
    assert (root / "etc/htr/htr.yaml").read_text() == shipped
    assert ran["config"].stdout == shipped
