"""htrctl verify: every corruption class is detected, each by its own test."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from htrctl.errors import ModelCorruptError, ModelMissingError
from htrctl.manifest import MANIFEST_NAME, read_manifest
from htrctl.provision import provision
from htrctl.verify import read_safetensors_header, verify_model_dir

SHARD = "model-00002-of-00003.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def provisioned_src(demo_model_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("verify") / "model"
    provision(str(demo_model_dir), str(dest), progress=False)
    return dest


@pytest.fixture
def model(provisioned_src, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(provisioned_src, dest)
    return dest


def codes(report):
    return {(f.code, f.path) for f in report.findings}


def test_a_clean_directory_verifies_quick_and_full_with_no_findings(model):
    for quick in (False, True):
        r = verify_model_dir(model, quick=quick)
        assert r.ok, r.to_dict()
        assert r.findings == []
        assert r.manifest_digest == read_manifest(model)[1]
    assert verify_model_dir(model).bytes_hashed == read_manifest(model)[0].total_size
    verify_model_dir(model).raise_for_problems()  # does not raise


def test_verify_fails_when_a_shard_is_missing_and_names_provision_as_the_fix(model):
    (model / SHARD).unlink()
    r = verify_model_dir(model, quick=True)
    assert ("missing", SHARD) in codes(r) and not r.ok
    with pytest.raises(ModelMissingError, match=SHARD) as exc:
        r.raise_for_problems()
    assert "htrctl provision" in exc.value.remedy


def test_verify_fails_on_a_file_the_manifest_does_not_list(model):
    (model / "stray.txt").write_text("x")
    r = verify_model_dir(model, quick=True)
    assert codes(r) == {("extra", "stray.txt")} and not r.ok


def test_verify_fails_when_a_file_is_truncated(model):
    p = model / SHARD
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 100)
    r = verify_model_dir(model, quick=True)
    assert ("truncated", SHARD) in codes(r)
    with pytest.raises(ModelCorruptError, match="truncated"):
        r.raise_for_problems()


def test_a_modified_file_passes_quick_and_fails_the_full_hash(model):
    p = model / SHARD
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor: same size, header still valid
    p.write_bytes(bytes(data))
    assert verify_model_dir(model, quick=True).ok  # --quick does not hash
    r = verify_model_dir(model)
    assert codes(r) == {("modified", SHARD)}


def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    hb = json.dumps(header).encode()
    hb += b" " * ((-len(hb)) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


def test_verify_fails_when_a_safetensors_header_is_not_json(model):
    p = model / SHARD
    data = bytearray(p.read_bytes())
    data[8:16] = b"{{{{{{{{"  # same size: only the header check can see it
    p.write_bytes(bytes(data))
    r = verify_model_dir(model, quick=True)
    assert ("bad_header", SHARD) in codes(r)
    assert "not valid JSON" in next(f.problem for f in r.findings if f.code == "bad_header")


def test_hostile_header_length_is_rejected_before_reading(tmp_path):
    """A header claiming 1 TiB in a (sparse) 2 TiB file must not be read: run under a 1 GiB address-space limit."""
    p = tmp_path / "hostile.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 1 << 40))
        f.truncate(1 << 41)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from htrctl.verify import HeaderError, read_safetensors_header
        try:
            read_safetensors_header({str(p)!r})
        except HeaderError as exc:
            print("REJECTED", exc)
            sys.exit(0)
        sys.exit(3)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "exceeds the" in out.stdout and "limit" in out.stdout


def test_verify_fails_when_the_header_length_exceeds_the_file(model):
    p = model / SHARD
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 1)
    p.write_bytes(bytes(data))
    r = verify_model_dir(model, quick=True)
    problem = next(f.problem for f in r.findings if f.code == "bad_header")
    assert "exceeds the file size" in problem


def test_verify_fails_when_tensor_offsets_run_beyond_the_file(model):
    p = model / SHARD

    def grow(header):
        name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        header[name]["data_offsets"][1] += 4096
        header[name]["shape"][0] += 4096 // 4 // max(1, _row(header[name]["shape"]))

    _rewrite_header(p, grow)
    r = verify_model_dir(model, quick=True)
    problem = next(f.problem for f in r.findings if f.code == "bad_header" and f.path == SHARD)
    assert "beyond" in problem


def _row(shape):
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def test_verify_fails_when_the_index_names_a_missing_shard(model):
    idx = json.loads((model / INDEX).read_text())
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "model-00009-of-00009.safetensors"
    (model / INDEX).write_text(json.dumps(idx))
    r = verify_model_dir(model, quick=True)
    assert ("index_missing_shard", "model-00009-of-00009.safetensors") in codes(r)


def test_verify_fails_when_the_index_names_a_tensor_the_shard_lacks(model):
    idx = json.loads((model / INDEX).read_text())
    idx["weight_map"]["model.language_model.layers.9.mlp.up_proj.weight"] = SHARD
    (model / INDEX).write_text(json.dumps(idx))
    r = verify_model_dir(model, quick=True)
    assert ("index_missing_tensor", SHARD) in codes(r)


def test_verify_fails_when_the_adapter_is_for_another_architecture(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "llama"
    (model / "config.json").write_text(json.dumps(cfg))
    r = verify_model_dir(model, quick=True)
    assert ("adapter_mismatch", "final_model/adapter_config.json") in codes(r)


def test_verify_fails_when_the_adapter_targets_a_module_the_base_lacks(model):
    p = model / "final_model" / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["target_modules"] = cfg["target_modules"] + ["wqkv"]
    p.write_text(json.dumps(cfg))
    r = verify_model_dir(model, quick=True)
    problem = next(f.problem for f in r.findings if f.code == "adapter_mismatch")
    assert "['wqkv']" in problem


def test_verify_fails_when_adapter_shapes_do_not_fit_the_base(model):
    p = model / "final_model" / "adapter_model.safetensors"

    def widen(header):  # claim a lora_A with a different in_features (bytes stay consistent)
        for k, v in header.items():
            if k.endswith("q_proj.lora_A.weight"):
                r, n = v["shape"]
                v["shape"] = [r * 2, n // 2]

    _rewrite_header(p, widen)
    r = verify_model_dir(model, quick=True)
    problem = next(f.problem for f in r.findings if f.code == "adapter_mismatch")
    assert "q_proj" in problem and "do not fit" in problem


def _edit_manifest(model, fn):
    p = model / MANIFEST_NAME
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


@pytest.mark.parametrize("bad", ["../outside.json", "final_model/../../x", "/etc/passwd"])
def test_verify_refuses_manifest_paths_escaping_the_directory(model, bad):
    _edit_manifest(model, lambda m: m["files"].append({"path": bad, "size": 1, "sha256": "0" * 64}))
    r = verify_model_dir(model)
    assert ("unsafe_path", bad) in codes(r) and not r.ok


def test_verify_refuses_a_symlink_pointing_outside_and_never_reads_it(model, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    r = verify_model_dir(model)
    assert ("unsafe_path", "tokenizer.json") in codes(r)
    assert ("modified", "tokenizer.json") not in codes(r)  # never read through the link


def test_verify_fails_when_the_manifest_is_not_json(model):
    (model / MANIFEST_NAME).write_text("{")
    r = verify_model_dir(model, quick=True)
    assert ("bad_manifest", MANIFEST_NAME) in codes(r) and not r.ok


def test_without_a_manifest_only_the_structure_is_checked_and_a_remedy_given(demo_model_copy):
    r = verify_model_dir(demo_model_copy)
    assert r.ok and r.manifest_digest is None
    (f,) = r.findings
    assert f.code == "no_manifest" and f.severity == "warning"
    assert f"htrctl provision {demo_model_copy} {demo_model_copy}" in f.remedy


def test_an_adapter_without_its_base_fails_naming_the_hub_id_and_base_option(demo_model_dir, tmp_path):
    only = tmp_path / "adapter-only"
    shutil.copytree(demo_model_dir / "final_model", only / "final_model")
    r = verify_model_dir(only, quick=True)
    f = next(f for f in r.findings if f.code == "base_missing")
    assert "Qwen/Qwen3-VL-8B-Instruct" in f.problem and "--base" in f.remedy
    with pytest.raises(ModelMissingError, match="base model is missing"):
        r.raise_for_problems()


def test_a_missing_directory_is_reported_not_found():
    r = verify_model_dir("/nonexistent/model")
    assert not r.ok and r.findings[0].code == "not_found"


def test_header_parser_accepts_the_demo_shards(demo_model_dir):
    header, start, size = read_safetensors_header(demo_model_dir / SHARD)
    assert header and start > 8 and size == (demo_model_dir / SHARD).stat().st_size


def test_cli_exits_0_with_json_when_clean_and_1_naming_a_missing_shard(model, capsys):
    from htrctl.cli import main

    assert main(["verify", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    (model / SHARD).unlink()
    assert main(["verify", str(model), "--quick"]) == 1
    captured = capsys.readouterr()
    assert SHARD in captured.err and "FAILED" in captured.out



def _verify_as_nobody(model) -> dict:
    code = textwrap.dedent(f"""
        import json
        from htrctl.verify import verify_model_dir
        from htrctl.errors import ModelError
        r = verify_model_dir({str(model)!r}, quick=True)
        try:
            r.raise_for_problems()
        except ModelError as e:
            print(json.dumps({{"ok": r.ok, "msg": e.one_line()}}))
    """)
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_unreadable_files_are_findings_not_tracebacks(model, tmp_path):
    """The service user cannot read a 0600 shard, or reach the directory: verify names it and the fix."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not available")
    # tmp_path's parents are 0700 (root's): unreachable for uid 65534.
    res = _verify_as_nobody(model)
    assert res["ok"] is False
    assert "model directory cannot be reached: permission denied" in res["msg"]
    import tempfile

    reachable = Path(tempfile.mkdtemp(prefix="htr-verify-"))
    try:
        reachable.chmod(0o755)
        dest = reachable / "model"
        shutil.copytree(model, dest)
        shard = sorted(dest.glob("model-*.safetensors"))[0]
        shard.chmod(0o600)
        res = _verify_as_nobody(dest)
        assert res["ok"] is False
        assert shard.name in res["msg"] and "cannot be read: Permission denied" in res["msg"]
        assert f"chmod -R a+rX {dest}" in res["msg"]
    finally:
        shutil.rmtree(reachable)


@pytest.mark.parametrize("rel", ["pytorch_model.bin", "final_model/adapter_model.bin", "final_model/training_args.bin"])
def test_pickle_files_anywhere_are_flagged_as_never_loaded(model, rel):
    """Pickle weights are never loaded; verify says so wherever they lie (also next to the safetensors adapter)."""
    (model / rel).write_bytes(b"\x80\x04pickled")
    report = verify_model_dir(model, quick=True)
    hits = [f for f in report.findings if f.code == "pickle_weights" and f.path == rel]
    assert hits and "never loaded" in hits[0].problem
