"""The manifest schema, atomic writes, safe paths and parallel hashing."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from htrctl.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestFormatError,
    hash_file,
    hash_files,
    read_manifest,
    unsafe_relpath,
    walk_files,
    write_manifest,
)


def test_a_manifest_round_trips_and_its_digest_is_the_sha256sum_listing(tmp_path):
    m = Manifest(files=[FileEntry("b.json", 2, "a" * 64), FileEntry("a/x.safetensors", 10, "b" * 64)],
                 base={"id": "Qwen/Qwen3-VL-8B-Instruct"}, sources={"model": "/src"})
    digest = write_manifest(tmp_path, m)
    data = (tmp_path / MANIFEST_NAME).read_bytes()
    # the model's digest is its content: sha256sum's listing of the files, sorted by path
    listing = f"{'b' * 64}  a/x.safetensors\n{'a' * 64}  b.json\n"
    assert digest == hashlib.sha256(listing.encode()).hexdigest() != hashlib.sha256(data).hexdigest()
    back, d2 = read_manifest(tmp_path)
    assert d2 == digest
    assert [f.path for f in back.files] == ["a/x.safetensors", "b.json"]  # sorted on write
    assert back.base == {"id": "Qwen/Qwen3-VL-8B-Instruct"} and back.sources == {"model": "/src"}
    assert json.loads(data)["schema_version"] == 1
    # no temp files left next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]


def test_digest_is_content_only(tmp_path):
    """The same files provisioned at another time, from another source, on another host: the same digest."""
    files = [FileEntry("config.json", 2, "c" * 64), FileEntry("final_model/adapter_model.safetensors", 9, "d" * 64)]
    one = Manifest(files=list(files), sources={"model": "/a"}, created="2026-01-01T00:00:00Z",
                   provenance={"config.json": [2, 1, 1]}, tool={"name": "htrctl", "version": "0.1.0"})
    two = Manifest(files=list(reversed(files)), sources={"model": "host:/b"}, created="2026-11-29T12:00:00Z",
                   provenance={"config.json": [2, 7, 9]}, tool={"name": "htrctl", "version": "9.9"})
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    assert write_manifest(tmp_path / "1", one) == write_manifest(tmp_path / "2", two)
    assert read_manifest(tmp_path / "1")[1] == read_manifest(tmp_path / "2")[1]
    changed = Manifest(files=[files[0], FileEntry(files[1].path, 9, "e" * 64)])
    assert changed.digest != one.digest


@pytest.mark.parametrize(
    "body, why",
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"schema_version": 99, "files": []}', "not supported"),
        (b'{"schema_version": 1}', "'files'"),
        (b'{"schema_version": 1, "files": [{"path": "a", "size": -1, "sha256": "' + b"0" * 64 + b'"}]}', "files[0]"),
    ],
)
def test_invalid_manifests_are_rejected(tmp_path, body, why):
    (tmp_path / MANIFEST_NAME).write_bytes(body)
    with pytest.raises(ManifestFormatError, match=want(why)):
        read_manifest(tmp_path)


def want(s: str) -> str:
    import re

    return re.escape(s)


def test_reading_a_directory_without_a_manifest_gives_none(tmp_path):
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize(
    "rel, bad",
    [("a/b.json", False), ("../x", True), ("a/../../x", True), ("/etc/passwd", True), ("a\\b", True),
     ("a//b", True), ("./a", True), ("", True)],
)
def test_unsafe_relpath_flags_paths_that_leave_or_bend_the_directory(rel, bad):
    assert (unsafe_relpath(rel) is not None) is bad


def test_walk_files_flags_symlinks_outside(tmp_path):
    root = tmp_path / "m"
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text("{}")
    (root / "sub" / "b.bin").write_bytes(b"x")
    outside = tmp_path / "secret"
    outside.write_text("s")
    (root / "leak").symlink_to(outside)
    (root / "inside").symlink_to(root / "a.json")
    (root / "dirlink").symlink_to(tmp_path)
    (root / MANIFEST_NAME).write_text("{}")
    files, unsafe = walk_files(root)
    assert files == ["a.json", "inside", "sub/b.bin"]
    reasons = dict(unsafe)
    assert "outside" in reasons["leak"] and "dirlink" in reasons


def test_hash_files_matches_hashlib(tmp_path):
    blobs = {f"f{i}": os.urandom(3 * 1024 * 1024 + i) for i in range(5)}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    got = hash_files(tmp_path, [*blobs, "empty"], workers=3)
    assert got == {**{n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()},
                   "empty": hashlib.sha256(b"").hexdigest()}
    seen = []
    assert hash_file(tmp_path / "f0", seen.append) == got["f0"]
    assert sum(seen) == len(blobs["f0"])
