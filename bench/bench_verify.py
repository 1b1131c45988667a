"""Benchmark: verify and provision on a directory of the 8B model's shape (CPU only, not a timed test).

    python bench/bench_verify.py                 # files of the real sizes (~17.5 GB; needs 2x that on disk)
    python bench/bench_verify.py --scale 0.25    # every file a quarter of its real size
    python bench/bench_verify.py --json out.json

Prints, in one run on the same files:

1. full ``verify`` throughput as a ratio to ``sha256sum`` over the same files
   (target >= 1.0 on 2 cores). Both run on a warm page cache (the files are
   read once first), alternately, best of ``--repeat``;
2. the time of a no-op re-provision (target < 1 s), in-process and as a
   ``htrctl provision`` command (Python start-up included);
3. the bytes moved when one shard changed (target: that shard only).

The directory mimics Qwen3-VL-8B-Instruct: four safetensors shards of about
the real sizes (17.5 GB in all), an index mapping tensors to them, config and
tokenizer files. Shard contents are a repeated random block (hashing speed
does not depend on content); headers are valid safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Qwen3-VL-8B-Instruct's four shards (bytes, approximately) -- 17.5 GB in all.
SHARD_SIZES = [4_900_000_000, 4_920_000_000, 4_990_000_000, 2_730_000_000]
BLOCK = 64 * 2**20


def make_model(root: Path, scale: float) -> Path:
    import struct

    root.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(BLOCK))
    n = len(SHARD_SIZES)
    weight_map = {}
    for i, full in enumerate(SHARD_SIZES, 1):
        size = int(full * scale) // 2 * 2
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensor = f"model.language_model.layers.{i}.mlp.weight"
        weight_map[tensor] = name
        header = json.dumps({tensor: {"dtype": "BF16", "shape": [size // 2], "data_offsets": [0, size]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(root / name, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            left, k = size, 0
            while left:
                block[:8] = struct.pack("<Q", k)  # every block differs
                chunk = memoryview(block)[: min(left, BLOCK)]
                f.write(chunk)
                left -= len(chunk)
                k += 1
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"architectures": ["Qwen3VLForConditionalGeneration"],
                                                  "model_type": "qwen3_vl"}))
    (root / "tokenizer.json").write_bytes(os.urandom(11 * 2**20))
    for name in ("generation_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        (root / name).write_text("{}")
    return root


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "htr-manifest.json")


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(8 * 2**20):
                pass


def time_sha256sum(paths: list[Path]) -> float:
    t = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, paths)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def time_verify(root: Path) -> float:
    from htrctl.verify import verify_model_dir

    t = time.perf_counter()
    report = verify_model_dir(root, quick=False)
    dt = time.perf_counter() - t
    assert report.ok, report.to_dict()
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="file sizes as a fraction of the real ones")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the work directory is made (default /var/tmp); only that new directory is removed")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from htrctl.provision import provision

    parent = args.dir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="htr-bench-", dir=parent))  # ours alone: removed at the end, never --dir

    need = int(sum(SHARD_SIZES) * args.scale * 2.1)
    free = shutil.disk_usage(work).free
    if need > free:
        print(f"needs {need / 1e9:.1f} GB free in {work}, has {free / 1e9:.1f} GB: use --scale", file=sys.stderr)
        work.rmdir()
        return 2
    out: dict = {"scale": args.scale, "cpus": os.cpu_count()}
    try:
        t = time.perf_counter()
        src = make_model(work / "src", args.scale)
        out["generate_s"] = time.perf_counter() - t
        paths = files_of(src)
        total = sum(p.stat().st_size for p in paths)
        out["total_bytes"] = total
        print(f"model dir: {len(paths)} files, {total / 1e9:.2f} GB (scale {args.scale}) in {work}", file=sys.stderr)

        # provision (first time): copy + hash in one pass
        dest = work / "dest"
        t = time.perf_counter()
        r = provision(str(src), str(dest), progress=False)
        out["provision_first_s"] = time.perf_counter() - t
        out["provision_first_bytes"] = r.bytes_copied

        # 1. verify vs sha256sum on the same files (dest), warm cache, alternating, best of N
        dpaths = files_of(dest)
        warm(dpaths)
        sums, vers = [], []
        for _ in range(args.repeat):
            sums.append(time_sha256sum(dpaths))
            vers.append(time_verify(dest))
        out["sha256sum_s"], out["verify_s"] = min(sums), min(vers)
        out["sha256sum_GBps"] = total / min(sums) / 1e9
        out["verify_GBps"] = total / min(vers) / 1e9
        out["verify_vs_sha256sum"] = min(sums) / min(vers)

        # 2. no-op re-provision
        noops = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            r = provision(str(src), str(dest), progress=False)
            noops.append(time.perf_counter() - t)
            assert r.noop
        out["noop_inprocess_s"] = min(noops)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "htrctl", "-q", "provision", str(src), str(dest)], check=True)
        out["noop_cli_s"] = time.perf_counter() - t

        # 3. one shard changed: bytes moved
        shard = src / "model-00002-of-00004.safetensors"
        with open(shard, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        t = time.perf_counter()
        r = provision(str(src), str(dest), progress=False)
        out["one_shard_s"] = time.perf_counter() - t
        out["one_shard_bytes_moved"] = r.bytes_copied
        out["one_shard_size"] = shard.stat().st_size
        out["one_shard_copied_files"] = [a.path for a in r.actions if a.kind == "copy"]
        out["one_shard_moved_vs_shard"] = r.bytes_copied / shard.stat().st_size
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"""
verify (full sha256, {os.cpu_count()} cpus)  {out['verify_GBps']:.2f} GB/s   sha256sum {out['sha256sum_GBps']:.2f} GB/s
  ratio verify / sha256sum throughput:   {out['verify_vs_sha256sum']:.2f}   (target >= 1.0)
no-op re-provision:                      {out['noop_inprocess_s'] * 1000:.0f} ms in-process, {out['noop_cli_s'] * 1000:.0f} ms as a command   (target < 1 s)
one shard changed:                       {out['one_shard_bytes_moved'] / 1e9:.3f} GB moved for a {out['one_shard_size'] / 1e9:.3f} GB shard (ratio {out['one_shard_moved_vs_shard']:.3f}; files {out['one_shard_copied_files']})
first provision:                         {out['provision_first_bytes'] / 1e9:.2f} GB in {out['provision_first_s']:.1f} s""")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
