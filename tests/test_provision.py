"""htrctl provision, local: base resolution, pair checks, staging, lock, resume, no-op, dry-run."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from htrctl.errors import (ExitCode, IncompatibleAdapterError, InterruptedRunError, LockedError, ModelMissingError,
                           ProvisionError)
from htrctl.manifest import MANIFEST_NAME, read_manifest
from htrctl.provision import parse_location, Hub, Local, Remote, provision
from htrctl.verify import verify_model_dir

SHARD = "model-00002-of-00003.safetensors"
HUB_ID = "Qwen/Qwen3-VL-8B-Instruct"


def siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def test_locations_parse_as_hub_remote_or_local():
    assert parse_location("hf://Qwen/Qwen3-VL-8B-Instruct@abc") == Hub(HUB_ID, "abc")
    assert parse_location("user@gpu1:/srv/models/htr") == Remote("user@gpu1", "/srv/models/htr")
    assert parse_location("gpu1:models") == Remote("gpu1", "models")
    assert parse_location("/srv/models") == Local(Path("/srv/models"))
    assert parse_location("./a:b") == Local(Path("./a:b"))
    with pytest.raises(ProvisionError):
        parse_location("hf://not-a-repo")


def test_full_model_provisions_and_verifies(demo_model_dir, tmp_path):
    dest = tmp_path / "dest" / "model"
    r = provision(str(demo_model_dir), str(dest), progress=False)
    assert not r.noop and r.files == 13 and r.bytes_copied == r.total_size
    report = verify_model_dir(dest)
    assert report.ok, report.to_dict()
    assert report.manifest_digest == r.manifest_digest
    m, _ = read_manifest(dest)
    assert m.base["id"] == HUB_ID and m.base["model_type"] == "qwen3_vl" and m.base["dtype"] == "F32"
    assert m.adapter["sha256"] == hashlib.sha256(
        (demo_model_dir / "final_model/adapter_model.safetensors").read_bytes()).hexdigest()
    assert m.tool["name"] == "htrctl" and m.schema_version == 1
    # nothing left beside DEST: the lock file goes with the lock
    assert siblings(dest) == ["model"]


def test_reprovision_is_a_noop(demo_model_dir, tmp_path):
    dest = tmp_path / "model"
    provision(str(demo_model_dir), str(dest), progress=False)
    before = {p: (dest / p).stat().st_ino for p in os.listdir(dest)}
    r = provision(str(demo_model_dir), str(dest), progress=False)
    assert r.noop and r.bytes_copied == 0 and r.actions == []
    assert {p: (dest / p).stat().st_ino for p in os.listdir(dest)} == before


def test_one_changed_shard_moves_only_that_shard(demo_model_copy, tmp_path):
    dest = tmp_path / "dest"
    provision(str(demo_model_copy), str(dest), progress=False)
    inode = (dest / "config.json").stat().st_ino
    shard = demo_model_copy / SHARD
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    r = provision(str(demo_model_copy), str(dest), progress=False)
    copied = [a.path for a in r.actions if a.kind == "copy"]
    assert copied == [SHARD] and r.bytes_copied == shard.stat().st_size
    assert (dest / "config.json").stat().st_ino == inode  # hard-linked, not copied
    assert verify_model_dir(dest).ok


def test_adapter_without_base_is_an_error_naming_the_fix(demo_model_dir, tmp_path):
    src = tmp_path / "incident"
    shutil.copytree(demo_model_dir / "final_model", src / "final_model")
    dest = tmp_path / "dest"
    with pytest.raises(ModelMissingError) as exc:
        provision(str(src), str(dest), progress=False)
    err = exc.value
    assert HUB_ID in err.message and "download" in err.message
    assert f"htrctl provision {src} {dest} --base" in err.remedy
    assert f"htrctl provision {src} {dest} --allow-download" in err.remedy
    assert err.exit_code == ExitCode.MODEL
    assert not dest.exists()


def test_an_adapter_with_a_local_base_provisions_a_verified_tree(demo_model_dir, tmp_path):
    src = tmp_path / "incident"
    shutil.copytree(demo_model_dir / "final_model", src / "final_model")
    base = tmp_path / "base"
    shutil.copytree(demo_model_dir, base, ignore=shutil.ignore_patterns("final_model"))
    dest = tmp_path / "dest"
    r = provision(str(src), str(dest), base=str(base), progress=False)
    assert r.base == str(base)
    assert verify_model_dir(dest).ok
    assert (dest / "final_model/adapter_config.json").is_file() and (dest / SHARD).is_file()


def test_bare_adapter_directory_lands_in_final_model(demo_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(demo_model_dir, base, ignore=shutil.ignore_patterns("final_model"))
    dest = tmp_path / "dest"
    provision(str(demo_model_dir / "final_model"), str(dest), base=str(base), progress=False)
    assert (dest / "final_model/adapter_model.safetensors").is_file()
    assert verify_model_dir(dest, quick=True).ok


def _fake_hf_cache(base: Path, repo: str) -> Path:
    """The hub cache layout (blobs + snapshot symlinks + refs/main), as huggingface_hub writes it."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / commit
    for p in sorted(base.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            blob = repo_dir / "blobs" / digest
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, blob)
            link = snap / p.relative_to(base)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_the_base_is_taken_from_the_local_hf_cache_offline(demo_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tmp_path / "base"
    shutil.copytree(demo_model_dir, base, ignore=shutil.ignore_patterns("final_model"))
    _fake_hf_cache(base, HUB_ID)
    src = tmp_path / "incident"
    shutil.copytree(demo_model_dir / "final_model", src / "final_model")
    dest = tmp_path / "dest"
    r = provision(str(src), str(dest), progress=False)
    assert r.base == f"hf://{HUB_ID}"
    assert verify_model_dir(dest).ok
    assert not (dest / SHARD).is_symlink()  # real files, not links into the cache
    # and as an explicit SOURCE
    dest2 = tmp_path / "dest2"
    provision(f"hf://{HUB_ID}", str(dest2), progress=False)
    assert (dest2 / "config.json").is_file() and verify_model_dir(dest2).ok


def test_allow_download_offline_is_a_clear_error(demo_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "incident"
    shutil.copytree(demo_model_dir / "final_model", src / "final_model")
    with pytest.raises(ProvisionError, match="cannot download") as exc:
        provision(str(src), str(tmp_path / "dest"), allow_download=True, progress=False)
    assert "--base" in exc.value.remedy and exc.value.exit_code == ExitCode.PROVISION


def test_mismatched_pair_is_refused_before_copying(demo_model_dir, tmp_path):
    src = tmp_path / "incident"
    shutil.copytree(demo_model_dir / "final_model", src / "final_model")
    base = tmp_path / "base"
    shutil.copytree(demo_model_dir, base, ignore=shutil.ignore_patterns("final_model"))
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"] = "llama"
    (base / "config.json").write_text(json.dumps(cfg))
    dest = tmp_path / "dest"
    with pytest.raises(IncompatibleAdapterError, match="llama"):
        provision(str(src), str(dest), base=str(base), progress=False)
    assert not dest.exists()


def test_lock_stops_a_second_provision(demo_model_dir, tmp_path):
    dest = tmp_path / "model"
    with open(tmp_path / ".model.htr-lock", "w") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockedError, match="pid 4242"):
            provision(str(demo_model_dir), str(dest), progress=False)
    assert not dest.exists()


def test_interrupted_run_resumes_without_copying_complete_files(demo_model_dir, tmp_path, monkeypatch):
    import htrctl.provision.staging as prov

    real = prov._copy_hash
    calls = []

    def failing(src, dst, advance, resume):
        calls.append(src.name)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the copy
        return real(src, dst, advance, resume)

    monkeypatch.setattr(prov, "COPY_WORKERS", 1)
    monkeypatch.setattr(prov, "_copy_hash", failing)
    dest = tmp_path / "model"
    with pytest.raises(InterruptedRunError, match=r"kept in .*/\.model\.htr-work") as stopped:
        provision(str(demo_model_dir), str(dest), progress=False)
    assert stopped.value.exit_code == 130 and "run the same command again" in stopped.value.remedy
    assert not dest.exists()  # never looks complete
    monkeypatch.setattr(prov, "_copy_hash", real)
    r = provision(str(demo_model_dir), str(dest), progress=False)
    resumed = {a.path for a in r.actions if a.kind == "resume"}
    assert 3 <= len(resumed) < r.files  # the files done before the interrupt (a worker may finish one more)
    assert r.bytes_copied == r.total_size - sum((demo_model_dir / p).stat().st_size for p in resumed)
    assert verify_model_dir(dest).ok
    assert not (tmp_path / ".model.htr-work").exists()


def test_partial_file_resumes_from_its_offset(demo_model_dir, tmp_path, monkeypatch):
    import htrctl.provision.staging as prov

    real = prov._copy_hash
    biggest = max((p for p in demo_model_dir.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)

    def half_then_die(src, dst, advance, resume):
        if src.name == biggest.name:
            part = dst.with_name(dst.name + ".htr-part")
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
            raise KeyboardInterrupt
        return real(src, dst, advance, resume)

    monkeypatch.setattr(prov, "COPY_WORKERS", 1)
    monkeypatch.setattr(prov, "_copy_hash", half_then_die)
    dest = tmp_path / "model"
    with pytest.raises(InterruptedRunError):
        provision(str(demo_model_dir), str(dest), progress=False)
    monkeypatch.setattr(prov, "_copy_hash", real)
    r = provision(str(demo_model_dir), str(dest), progress=False)
    size = biggest.stat().st_size
    assert r.bytes_copied <= r.total_size - size // 2  # the first half was not copied again
    assert verify_model_dir(dest).ok


def test_dry_run_changes_nothing(demo_model_dir, tmp_path):
    dest = tmp_path / "model"
    r = provision(str(demo_model_dir), str(dest), dry_run=True, progress=False)
    assert r.dry_run and not dest.exists()
    assert {a.kind for a in r.actions} == {"copy"}
    assert r.bytes_copied == r.total_size > 0
    assert siblings(dest) == []


def test_refuses_to_replace_a_foreign_directory(demo_model_dir, tmp_path):
    dest = tmp_path / "home"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    with pytest.raises(ProvisionError, match="refusing"):
        provision(str(demo_model_dir), str(dest), progress=False)
    assert (dest / "thesis.tex").read_text() == "precious"


def test_adopt_in_place_writes_a_manifest(demo_model_copy):
    r = provision(str(demo_model_copy), str(demo_model_copy), progress=False)
    assert (demo_model_copy / MANIFEST_NAME).is_file() and r.manifest_digest
    assert verify_model_dir(demo_model_copy).ok
    assert provision(str(demo_model_copy), str(demo_model_copy), progress=False).noop


def test_unsafe_source_is_refused(demo_model_copy, tmp_path):
    (tmp_path / "secret").write_text("s")
    (demo_model_copy / "leak.json").symlink_to(tmp_path / "secret")
    with pytest.raises(ProvisionError, match="outside"):
        provision(str(demo_model_copy), str(tmp_path / "dest"), progress=False)


def test_cli_reports_json_exits_0_and_a_second_run_is_a_noop(demo_model_dir, tmp_path, capsys):
    from htrctl.cli import main

    dest = tmp_path / "model"
    assert main(["provision", str(demo_model_dir), str(dest), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] == 13 and out["noop"] is False and out["manifest_digest"]
    assert main(["provision", str(demo_model_dir), str(dest), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["noop"] is True
    src = tmp_path / "incident"
    shutil.copytree(demo_model_dir / "final_model", src / "final_model")
    assert main(["provision", str(src), str(tmp_path / "x")]) == ExitCode.MODEL
    assert "--base" in capsys.readouterr().err


# The stated tolerance: merged and unmerged logits agree to 1e-4 (absolute) in float32 on the demo model.
MERGE_ATOL = 1e-4


@pytest.mark.slow
def test_merge_writes_a_variant_with_equal_logits(demo_model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from htrctl.merge import load_base_and_adapter

    dest = tmp_path / "model"
    r = provision(str(demo_model_dir), str(dest), merge=True, progress=False)
    assert r.merged
    m, _ = read_manifest(dest)
    v = m.variants["merged"]
    assert v["dtype"] == "float32" and v["adapter_sha256"] == m.adapter["sha256"]
    merged_files = sorted(e.path for e in m.files if e.path.startswith("merged/"))
    assert "merged/config.json" in merged_files and any(p.endswith(".safetensors") for p in merged_files)
    assert not any("tokenizer" in p or "processor" in p for p in merged_files)  # those stay at <dir>/
    assert verify_model_dir(dest).ok

    peft_model, _ = load_base_and_adapter(dest)
    merged = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        dest / "merged", local_files_only=True, use_safetensors=True, dtype=torch.float32).eval()
    assert next(merged.parameters()).dtype == torch.float32
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base_only = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base_only(input_ids=ids).logits
    diff = (want - got).abs().max().item()
    assert diff <= MERGE_ATOL, diff
    assert (want - plain).abs().max().item() > 100 * MERGE_ATOL  # the adapter does change the output
    # re-provisioning with --merge is a no-op while nothing changed
    assert provision(str(demo_model_dir), str(dest), merge=True, progress=False).noop


@pytest.mark.slow
def test_merged_variant_travels_with_its_record(demo_model_dir, tmp_path):
    pytest.importorskip("torch")
    first = tmp_path / "first"
    provision(str(demo_model_dir), str(first), merge=True, progress=False)
    second = tmp_path / "second"
    provision(str(first), str(second), progress=False)
    m1, m2 = read_manifest(first)[0], read_manifest(second)[0]
    assert m2.variants["merged"] == m1.variants["merged"]
    assert {e.path: e.sha256 for e in m2.files} == {e.path: e.sha256 for e in m1.files}
    assert verify_model_dir(second).ok


def test_republish_is_one_atomic_exchange(demo_model_copy, tmp_path, monkeypatch):
    import htrctl.provision.staging as prov

    dest = tmp_path / "dest"
    provision(str(demo_model_copy), str(dest), progress=False)
    (demo_model_copy / "config.json").write_text((demo_model_copy / "config.json").read_text() + " ")
    seen = []
    real = prov._exchange

    def spy(a, b):
        # at the moment of the swap DEST is the old, complete tree
        seen.append(verify_model_dir(b, quick=True).ok)
        return real(a, b)

    monkeypatch.setattr(prov, "_exchange", spy)
    provision(str(demo_model_copy), str(dest), progress=False)
    assert seen == [True]
    assert verify_model_dir(dest).ok and (dest / "config.json").read_text().endswith(" ")
    assert not (tmp_path / ".dest.htr-work").exists()


def test_a_swap_interrupted_between_renames_is_finished(demo_model_dir, tmp_path, monkeypatch):
    import htrctl.provision.staging as prov

    dest = tmp_path / "dest"
    provision(str(demo_model_dir), str(dest), progress=False)
    work = tmp_path / ".dest.htr-work"
    # the state a kill between the fallback's two renames leaves: DEST gone, new tree staged, old kept
    work.mkdir()
    shutil.copytree(dest, work / "tree")
    dest.rename(work / "old")
    r = provision(str(demo_model_dir), str(dest), progress=False)
    assert dest.is_dir() and verify_model_dir(dest).ok and r.noop
    assert not work.exists()
