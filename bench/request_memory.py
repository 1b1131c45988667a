"""Peak memory per decoded pixel through htrd's decoding and the Qwen3-VL image processor: the figure behind
``htrd.budget.BYTES_PER_PIXEL`` (the pixel budgets' exchange rate into bytes).

    .venv/bin/python bench/request_memory.py                     # a table, CPU only, ~1 min
    .venv/bin/python bench/request_memory.py --json out.json

Each case runs in a fresh process: encode a W x H image of random pixels in a mode and format, decode it with
``htrd.images`` (read_header + iter_pages) and run the processor on it -- the demo model's processor with the
real Qwen3-VL-8B size limits (``longest_edge`` 16,777,216 px, as in its preprocessor_config.json), or with the
demo's own tiny ones (``--demo-size``). Reported per pixel: the peak over the process's RSS just before
(``VmHWM``, reset through ``/proc/self/clear_refs``) after decoding and after preprocessing, and what is still
held once the decoded page is dropped (the processor's output, kept until the image is generated).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL_SIZE = {"longest_edge": 16_777_216, "shortest_edge": 65_536}
CASES = [("RGB", 2000, 1000, "PNG"), ("RGB", 4000, 2500, "PNG"), ("L", 4000, 2500, "PNG"),
         ("I;16", 4000, 2500, "PNG"), ("CMYK", 4000, 2500, "JPEG"), ("RGB", 4000, 2500, "TIFF")]

_CHILD = r"""
import gc, io, json, sys
import numpy as np
from PIL import Image
from transformers import AutoProcessor
from htrd.images import iter_pages, read_header
mode, w, h, fmt, model, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
kw = {"size": json.loads(size)} if size != "null" else {}
proc = AutoProcessor.from_pretrained(model, local_files_only=True, **kw)
text = ["<|vision_start|><|image_pad|><|vision_end|>"]
rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 200) if mode == "I;16" else Image.fromarray(rgb).convert(mode)
buf = io.BytesIO(); img.save(buf, fmt); data = buf.getvalue(); del img, rgb, buf
warm = io.BytesIO(); Image.new("RGB", (64, 64)).save(warm, "PNG")
for p in iter_pages(warm.getvalue(), read_header(warm.getvalue(), max_pixels=10**9)):
    proc(text=text, images=[p.image], return_tensors="pt")
gc.collect()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
def rss(): return status("VmRSS")
def peak(): return status("VmHWM")
base = rss()
open("/proc/self/clear_refs", "w").write("5")  # the peak so far (encoding the test image) is forgotten
page = next(iter_pages(data, read_header(data, max_pixels=10**9)))
decoded = peak()
enc = proc(text=text, images=[page.image], return_tensors="pt")
prepared = peak()
del page; gc.collect()
px = w * h
print(json.dumps({"mode": mode, "size": f"{w}x{h}", "format": fmt, "body_bytes": len(data),
                  "decode_peak_b_per_px": round((decoded - base) / px, 1),
                  "total_peak_b_per_px": round((prepared - base) / px, 1),
                  "held_b_per_px": round((rss() - base) / px, 1),
                  "pixel_values": list(enc["pixel_values"].shape)}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=str(REPO / ".cache" / "tests" / "demo-model"),
                   help="a model directory with a Qwen3-VL processor (default: the tests' demo model)")
    p.add_argument("--demo-size", action="store_true", help="keep the processor's own size limits")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    if not Path(a.model_dir, "processor_config.json").exists() and not Path(a.model_dir, "preprocessor_config.json").exists():
        print(f"no processor in {a.model_dir} (build the demo model: htrctl demo, or the tests)", file=sys.stderr)
        return 1
    size = "null" if a.demo_size else json.dumps(REAL_SIZE)
    rows = []
    for mode, w, h, fmt in CASES:
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(w), str(h), fmt, a.model_dir, size],
                             capture_output=True, text=True, timeout=600, check=False)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['mode']:5} {r['format']:5} {r['size']:>10}  decode {r['decode_peak_b_per_px']:5.1f} B/px  "
              f"decode+preprocess {r['total_peak_b_per_px']:5.1f} B/px  held after {r['held_b_per_px']:5.1f} B/px  "
              f"pixel_values {r['pixel_values']}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"processor_size": None if a.demo_size else REAL_SIZE, "rows": rows},
                                           indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
