"""The decode steps' attention alone on a GPU: flash attention's kernel against htrd.attention.triton_decode
in each tiling (keys per block, warps, pipeline stages, splits), 36 layers of the 8B model's shape (32 query
heads, 8 KV heads, head_dim 128) in one CUDA graph, on a random cache of 128 slots x 1024 positions.

    python bench/tune_decode_attention.py        # ~40 s on an H200 (compiles ~24 kernel variants)

For each batch and key count: flash's time and the six fastest tilings (with the read rate of the keys in use
and the relative error against flash), then the shipped tiling's. Use it to re-tune triton_decode's defaults
on another GPU; the whole step's A/B is bench/profile_decode.py --attention all.
"""
# ruff: noqa: B023 -- each closure is timed inside the iteration that made it
import itertools
import time

import torch
from htrd.attention import decode_splits, triton_decode

torch.manual_seed(0)
dev = torch.device("cuda"); dt = torch.bfloat16
nh, nkv, hd, NL = 32, 8, 128, 36
g = nh // nkv
S, M = 128, 1024
k_cache = [torch.randn(S, nkv, M, hd, device=dev, dtype=dt) for _ in range(NL)]
v_cache = [torch.randn(S, nkv, M, hd, device=dev, dtype=dt) for _ in range(NL)]
scale = hd ** -0.5
kv_heads = torch.arange(nkv, device=dev)
sms = torch.cuda.get_device_properties(dev).multi_processor_count
print(torch.__version__, torch.cuda.get_device_name(), "SMs", sms, flush=True)

def timeit(fn, n=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2): fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    gr.replay(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): gr.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1000

for B, lo, hi in ((1, 250, 330), (16, 250, 330), (64, 250, 330), (128, 250, 330), (128, 250, 900)):
    first = torch.randint(0, 60, (B,), device=dev)
    pos = torch.randint(lo, hi, (B,), device=dev).clamp(max=M - 1)
    pos = torch.maximum(pos, first + 1)
    q = torch.randn(B, nkv, g, hd, device=dev, dtype=dt)
    rows = torch.arange(B, device=dev)
    starts = (((rows * nkv)[:, None] + kv_heads[None]) * M + first[:, None]).reshape(-1)
    cu_k = torch.cat([starts, starts[-1:]]).int()
    used = (pos + 1 - first)[:, None].expand(B, nkv).reshape(-1).int()
    cu_q = torch.arange(B * nkv + 1, device=dev, dtype=torch.int32)
    out = torch.empty(B * nkv, g, hd, device=dev, dtype=dt)
    def f_flash():
        for li in range(NL):
            out.copy_(torch.ops.aten._flash_attention_forward(
                q.view(B * nkv, g, hd), k_cache[li].view(-1, 1, hd), v_cache[li].view(-1, 1, hd),
                cu_q, cu_k, 1, M, 0.0, False, False, scale=scale, seqused_k=used)[0])
    ref = torch.ops.aten._flash_attention_forward(q.view(B * nkv, g, hd), k_cache[0].view(-1, 1, hd), v_cache[0].view(-1, 1, hd),
                cu_q, cu_k, 1, M, 0.0, False, False, scale=scale, seqused_k=used)[0].float()
    t_flash = timeit(f_flash)
    kv_bytes = int(used.sum()) * hd * 2 * 2 * NL
    res = []
    auto = decode_splits(B * nkv, sms)
    for bn, w, st, sp in itertools.product((32, 64, 128), (4, 8), (2, 3), sorted({auto, 1, 2, 4, 8})):
        try:
            o = triton_decode(q.view(B * nkv, g, hd), k_cache[0].view(-1, hd), v_cache[0].view(-1, hd), scale=scale,
                              start=cu_k[:-1], used=used, splits=sp, block_n=bn, num_warps=w, num_stages=st)
            err = float((o.float() - ref).norm() / ref.norm())
            def f_tri():
                for li in range(NL):
                    out.copy_(triton_decode(q.view(B * nkv, g, hd), k_cache[li].view(-1, hd), v_cache[li].view(-1, hd),
                                            scale=scale, start=cu_k[:-1], used=used, splits=sp, block_n=bn,
                                            num_warps=w, num_stages=st))
            t = timeit(f_tri)
            res.append((t, bn, w, st, sp, err))
        except Exception as e:  # noqa: BLE001 -- a tiling that does not compile here is reported, not fatal
            print("  fail", bn, w, st, sp, str(e).splitlines()[0][:150])
    res.sort()
    print(f"B={B} used {lo}-{hi}: flash {t_flash:.3f} ms/36 layers ({kv_bytes / t_flash / 1e9:.2f} TB/s); auto splits {auto}", flush=True)
    for t, bn, w, st, sp, err in res[:6]:
        print(f"   triton {t:.3f} ms ({kv_bytes / t / 1e9:.2f} TB/s) block_n={bn} warps={w} stages={st} splits={sp} err={err:.2e}")
    shipped = timeit(lambda: [out.copy_(triton_decode(q.view(B * nkv, g, hd), k_cache[li].view(-1, hd),
                                                      v_cache[li].view(-1, hd), scale=scale, start=cu_k[:-1],
                                                      used=used, splits=auto)) for li in range(NL)])
    print(f"   shipped tiling {shipped:.3f} ms ({kv_bytes / shipped / 1e9:.2f} TB/s), {auto} split(s)", flush=True)
