"""``--shard I/N`` and ``--shard slurm``: the partition (pure) and its use by a real transcribe run."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from helpers import REPO

from htrctl.errors import UsageError
from htrctl.shard import Shard, from_slurm, names_digest, parse_shard, shard_inputs
from htrctl.transcribe import discover_inputs


def test_every_name_exactly_once_and_balanced():
    names = [f"book-{i % 7}/page-{i:05d}.png" for i in range(1001)]
    for n in (1, 2, 3, 8, 1001, 1500):
        parts = [Shard(i, n).select(names, key=str) for i in range(n)]
        flat = [x for p in parts for x in p]
        assert sorted(flat) == sorted(names) and len(flat) == len(names)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1, (n, sizes)


def test_independent_of_argument_order_and_spelling(tmp_path, monkeypatch):
    """Same names in another order (another machine's listing, another argument order): same shards."""
    names = [f"d{i % 3}/x{i}.png" for i in range(40)]
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    for i in range(3):
        a = Shard(i, 3).select(names, key=str)
        b = Shard(i, 3).select(shuffled, key=str)
        assert sorted(a) == sorted(b)
    assert names_digest(names) == names_digest(shuffled)
    assert names_digest(names) != names_digest(names[:-1])

    for rel in names:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    abs_items, _ = discover_inputs([str(tmp_path)])
    monkeypatch.chdir(tmp_path.parent)
    rel_items, _ = discover_inputs([tmp_path.name])
    for i in range(3):
        a = [it.rel for it in shard_inputs(Shard(i, 3), abs_items, [])[0]]
        b = [it.rel for it in shard_inputs(Shard(i, 3), rel_items, [])[0]]
        assert a == b and a


def test_missing_arguments_reported_by_shard_zero_only():
    missing = [("nope.png", "no such file or directory")]
    assert shard_inputs(Shard(0, 2), [], missing)[1] == missing
    assert shard_inputs(Shard(1, 2), [], missing)[1] == []


def test_a_run_removes_only_its_own_stale_temps(tmp_path):
    """Shards share --out: one task starting (or interrupted) must not delete another's write in progress."""
    from htrctl.transcribe import TEMP_SUFFIX, remove_stale_temps

    (tmp_path / "b").mkdir()
    mine = tmp_path / "b" / f".p1.png.json.4242.0123abcd{TEMP_SUFFIX}"
    theirs = tmp_path / "b" / f".p2.png.json.777.89abcdef{TEMP_SUFFIX}"
    for p in (mine, theirs):
        p.write_text("half")
    assert remove_stale_temps(tmp_path, {tmp_path / "b" / "p1.png.json"}) == 1
    assert not mine.exists() and theirs.exists()
    assert remove_stale_temps(tmp_path) == 1 and not theirs.exists()


@pytest.mark.parametrize("spec, want", [("0/1", (0, 1)), ("2/3", (2, 3)), (" 1 / 4 ", (1, 4))])
def test_shard_specs_parse_to_index_and_count(spec, want):
    s = parse_shard(spec)
    assert (s.index, s.count) == want


@pytest.mark.parametrize("spec", ["3/3", "1/0", "-1/2", "a/b", "1", "1/2/3"])
def test_bad_shard_specs_are_usage_errors(spec):
    with pytest.raises(UsageError):
        parse_shard(spec)


def test_the_shard_comes_from_the_slurm_array_environment():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5",
           "SLURM_ARRAY_TASK_MAX": "8"}
    assert from_slurm(env) == Shard(2, 4)
    assert parse_shard("slurm", env) == Shard(2, 4)
    stepped = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_MAX": "4", "SLURM_ARRAY_TASK_STEP": "2"}
    assert from_slurm(stepped) == Shard(2, 3)
    with pytest.raises(UsageError, match="not inside a Slurm array task"):
        from_slurm({})
    sparse = {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
              "SLURM_ARRAY_TASK_MAX": "9"}
    with pytest.raises(UsageError, match="not a contiguous range"):
        from_slurm(sparse)


def test_cli_rejects_bad_shard_and_stdin(tmp_path):
    r = subprocess.run([sys.executable, "-m", "htrctl", "transcribe", "-s", str(tmp_path / "none.sock"),
                        "--shard", "3/3", str(tmp_path)], capture_output=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and b"shard 3/3 does not exist" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "htrctl", "transcribe", "-s", str(tmp_path / "none.sock"),
                        "--shard", "0/2", "-"], input=b"x", capture_output=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and b"cannot split stdin" in r.stderr, r.stderr


@pytest.mark.slow
def test_three_shards_against_a_real_daemon(tmp_path, provisioned_model):
    """Three shard runs (concurrently, as array tasks would) cover every input once; --resume skips the done."""
    import json
    import re
    import shutil

    from daemon_harness import start_daemon

    samples = sorted(p for p in (REPO / "htrctl" / "data" / "samples").iterdir() if p.suffix in (".png", ".jpg"))
    src = tmp_path / "in"
    rels = []
    for i in range(7):
        rel = f"b{i % 2}/l{i}{samples[i % len(samples)].suffix}"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(samples[i % len(samples)], src / rel)
        rels.append(rel)
    out = tmp_path / "out"
    with start_daemon(tmp_path, provisioned_model, config={"generation": {"max_new_tokens": 4}}) as d:
        def run(i: int, *extra: str) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "htrctl", "transcribe", "-s", str(d.socket_path), "-f",
                                     "json", "--out", str(out), "--shard", f"{i}/3", *extra, str(src)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)

        procs = [run(i) for i in range(3)]
        done = []
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err.decode()
            m = re.search(rb"shard \d/3: (\d) of 7 inputs", err)
            assert m, err.decode()
            done.append(int(m.group(1)))
        assert sorted(done) == [2, 2, 3]
        got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert got == sorted(f"{r}.json" for r in rels)
        assert d.status()["counters"]["images"] == 7  # each input sent exactly once

        # a re-queued shard 1 whose outputs partly exist: only the missing one is transcribed
        mine = [r for r in sorted(rels)][1::3]
        (out / f"{mine[0]}.json").unlink()
        p = run(1, "--resume")
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()
        assert f"transcribed 1 of {len(mine)} inputs".encode() in err, err.decode()
        assert f"{len(mine) - 1} already done (--resume)".encode() in err, err.decode()
        assert d.status()["counters"]["images"] == 8
        assert json.loads((out / f"{mine[0]}.json").read_text())["input"].endswith(mine[0])

        # an output that cannot be written (here: a directory in its place) fails that input; the run ends
        (out / f"{mine[1]}.json").unlink()
        (out / f"{mine[1]}.json").mkdir()
        p = run(1, "--resume")
        _, err = p.communicate(timeout=240)
        assert p.returncode == 4, err.decode()
        assert f"{mine[1]}: cannot write the output".encode() in err, err.decode()
