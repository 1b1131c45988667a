"""Correctness of the fast generator on a GPU, against an fp32 reference (teacher-forced).

    python bench/check_fast_correctness.py /tmp/m8b [--new-tokens 32] [--json out.json] [--decode-attention sdpa] [--mixed]

For line images of 8 different widths, the fast generator (bf16, CUDA graphs)
chooses tokens alone, all batched together, and joining a running batch
midway; HF ``generate`` in bf16 on the same merged weights chooses its own.
Every chosen token is then scored by the merged model in **fp32**, teacher-
forced on that sequence: the gap between fp32's best logit and the chosen
token's logit (0 where fp32 agrees). Then the decode steps are teacher-forced
on HF's own tokens, with each decode attention the GPU has (Triton and flash
over each line's keys, SDPA over the masked span): their logits along the very sequences
HF chose, against fp32's -- the arithmetic alone, whatever near-tie a path
happened to follow.

The fast path passes when, teacher-forced, its largest logit error per step is
on average within x1.25 of HF bf16's own (largest within x1.5), and along its
own tokens its gaps stay within HF's: the 99th percentile within x1.5, the mean
within x2. The largest gap of 256 is reported, not judged: it is whichever
near-tie a run's path reaches -- on H200s the same code's went 0.115 -> 0.167
from one process to the next, and one token scored exactly 0.2524 in two runs
of different code, reached by some paths and not others.
Exit code 0 on pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PROMPT, line_image

WIDTHS = [(300, 64), (520, 96), (800, 120), (1000, 140), (1200, 160), (1500, 128), (1800, 150), (2000, 110)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cuda", help="cuda (the check), or cpu (a smoke run of this script)")
    ap.add_argument("--decode-attention", choices=["auto", "triton", "flash", "sdpa"], default="auto",
                    help="the decode steps' attention for the free-running paths (generation.decode_attention; "
                         "auto: the generator's choice); the teacher-forced check runs every one that runs here")
    ap.add_argument("--mixed", action="store_true",
                    help="the fast generator with mixed steps (generation.mixed_steps: prompts prefilled in chunks "
                         "inside the decode steps)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch
    from htrd.fastgen import FastGenerator
    from htrd.generation import Seq
    from htrd.model import load_model

    new = args.new_tokens
    images = [line_image(w, h, seed=i) for i, (w, h) in enumerate(WIDTHS)]
    fast = FastGenerator.load(args.model_dir, device=args.device, dtype="bfloat16", prompt=PROMPT,
                              batch_sizes=[1, 2, 4, 8], max_cache_len=1024, max_new_tokens=new, compile=args.device != "cpu",
                              mixed=args.mixed, decode_attention=args.decode_attention)
    fast.warmup(images[4], max_new_tokens=new)
    decode_attention, mlp_activation = fast.decode_attention, fast.mlp_activation
    preps = [fast.prepare(im) for im in images]
    alone = [fast.generate([p], min_new_tokens=new)[0].token_ids for p in preps]
    # The same lines three times more: a recurring shape's prefill is captured (third time) and replayed (fourth).
    replays0 = fast.prefill_replays
    for _ in range(3):
        replayed = [fast.generate([p], min_new_tokens=new)[0].token_ids for p in preps]
    n_replays = fast.prefill_replays - replays0
    # The two parts' graphs (on a GPU: the vision tower per (images, padded patch rows), the language model per
    # (lines, padded width)) without the whole-prefill graphs: those forgotten, each line once more.
    fast._prefill_graphs.clear()
    fast._prefill_seen.clear()
    replays0 = fast.prefill_replays
    lm_replayed = [fast.generate([p], min_new_tokens=new)[0].token_ids for p in preps]
    n_lm_replays = fast.prefill_replays - replays0
    batched = [g.token_ids for g in fast.generate(preps, min_new_tokens=new)]
    # joining: the odd lines join while the even ones are decoding
    done = {}
    fast.add([Seq(p, new, new, tag=i) for i, p in enumerate(preps) if i % 2 == 0])
    for f in fast.step():
        done[f.seq.tag] = f.token_ids
    fast.add([Seq(p, new, new, tag=i) for i, p in enumerate(preps) if i % 2 == 1])
    while fast.running():
        for f in fast.step():
            done[f.seq.tag] = f.token_ids
    joined = [done[i] for i in range(len(preps))]
    # HF bf16 generate on the same merged weights, one image at a time (and its raw logits per token)
    hf, hf_logits = [], []
    with torch.inference_mode():
        for p in preps:
            batch = fast._collate([p])
            out = fast.model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      pad_token_id=fast.pad_id, eos_token_id=fast.eos_ids, output_logits=True,
                                      return_dict_in_generate=True)
            hf.append(out.sequences[0, p.prompt_len:].tolist())
            hf_logits.append(torch.stack([x[0].float() for x in out.logits[1:]]).cpu())
    # The decode steps teacher-forced on HF's tokens, with each decode attention in turn: their logits along the
    # very sequences HF chose, so what differs is the arithmetic, not which near-tie a path happened to follow.
    forced = {}
    kinds = dict.fromkeys([fast.decode_attention, *(k for k in ("triton", "flash") if fast.decode_attention_runs(k)),
                           "sdpa"])
    for kind in kinds:
        forced[kind] = [forced_logits(fast, p, toks, attention=kind) for p, toks in zip(preps, hf)]
    fast_mixed, fast_packed, fast_mixed_steps = fast.mixed, fast.packed, fast.mixed_steps
    del fast
    dev = args.device
    if dev != "cpu":
        torch.cuda.empty_cache()
    ref = load_model(args.model_dir, device=dev, dtype="float32", merge=True).model

    def ref_logits(p, chosen: list[int]):
        """fp32's logits teacher-forced on *chosen*: row t is its prediction of chosen[t]."""
        ids = torch.cat([p.input_ids, torch.tensor(chosen[:-1], dtype=torch.long)])[None].to(dev)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": p.pixel_values.float().to(dev),
              "image_grid_thw": p.image_grid_thw.to(dev)}
        if p.mm_token_type_ids is not None:
            mm = torch.cat([p.mm_token_type_ids, torch.zeros(len(chosen) - 1, dtype=p.mm_token_type_ids.dtype)])
            kw["mm_token_type_ids"] = mm[None].to(dev)
        with torch.inference_mode():
            return ref(**kw).logits[0, p.prompt_len - 1:].float()

    def gaps(logits, chosen: list[int]) -> list[float]:
        best = logits.max(dim=-1).values
        pick = logits[torch.arange(len(chosen)), torch.tensor(chosen).to(dev)]
        return (best - pick).tolist()

    report = {"gpu": torch.cuda.get_device_name(0) if dev != "cpu" else "cpu", "new_tokens": new, "widths": WIDTHS,
              "decode_attention": decode_attention, "mlp_activation": mlp_activation, "paths": {}}
    hf_ref = [ref_logits(p, toks) for p, toks in zip(preps, hf)]  # scores HF's path and the forced decode steps
    for name, seqs in (("hf_bf16_generate", hf), ("fast_alone", alone), ("fast_batched", batched),
                       ("fast_joined", joined), ("fast_replayed_prefill", replayed),
                       ("fast_replayed_lm_part", lm_replayed)):
        g = [x for i, (p, s) in enumerate(zip(preps, seqs))
             for x in gaps(hf_ref[i] if seqs is hf else ref_logits(p, s), s)]
        agree = sum(1 for x in g if x <= 0.0)
        report["paths"][name] = {"max_gap": max(g), "p99_gap": sorted(g)[int(0.99 * (len(g) - 1))],
                                 "mean_gap": sum(g) / len(g), "fp32_agrees": agree, "tokens": len(g)}
    # Logit error against fp32 along HF's tokens (decode steps: tokens 1..), per step the largest |difference|
    errors = {"hf_bf16_generate": hf_logits, **{f"fast_forced_{k}_decode": v for k, v in forced.items()}}
    diffs = {name: [] for name in errors}
    for i in range(len(preps)):
        want = hf_ref[i][1:].cpu()
        for name, got in errors.items():
            diffs[name].append((got[i] - want).abs().amax(dim=-1))
    report["forced_logit_error"] = {}
    for name, d in diffs.items():
        d = torch.cat(d)
        report["forced_logit_error"][name] = {"mean_step_max": float(d.mean()), "max": float(d.max()),
                                              "steps": int(d.numel())}
    hf_err = report["forced_logit_error"]["hf_bf16_generate"]
    forced_ok = all(r["mean_step_max"] <= 1.25 * hf_err["mean_step_max"] + 1e-3
                    and r["max"] <= 1.5 * hf_err["max"] + 1e-3
                    for name, r in report["forced_logit_error"].items() if name.startswith("fast_"))
    report["prompt_tokens"] = [p.prompt_len for p in preps]
    report["fast_alone_equals_batched"] = sum(a == b for a, b in zip(alone, batched))
    report["fast_alone_equals_joined"] = sum(a == b for a, b in zip(alone, joined))
    report["fast_alone_equals_hf_bf16"] = sum(a == b for a, b in zip(alone, hf))
    report["fast_alone_equals_replayed"] = sum(a == b for a, b in zip(alone, replayed))
    report["fast_alone_equals_lm_replayed"] = sum(a == b for a, b in zip(alone, lm_replayed))
    report["prefill"] = "mixed steps" if fast_mixed else "packed" if fast_packed else "left-padded"
    report["mixed_steps"] = fast_mixed_steps
    report["prefill_graph_replays"] = n_replays
    report["lm_graph_replays"] = n_lm_replays
    h = report["paths"]["hf_bf16_generate"]
    fast_paths = ("fast_alone", "fast_batched", "fast_joined", "fast_replayed_prefill", "fast_replayed_lm_part")
    ok = forced_ok and all(report["paths"][n]["p99_gap"] <= 1.5 * h["p99_gap"] + 1e-3
                           and report["paths"][n]["mean_gap"] <= 2 * h["mean_gap"] + 1e-3 for n in fast_paths)
    report["pass"] = ok
    report["max_within_1_5x_hf"] = all(report["paths"][n]["max_gap"] <= 1.5 * h["max_gap"] + 1e-3 for n in fast_paths)
    print("| path | max gap (fp32 logits) | 99th percentile | mean gap | tokens where fp32 agrees |")
    print("|---|---|---|---|---|")
    for name, r in report["paths"].items():
        print(f"| {name} | {r['max_gap']:.4f} | {r['p99_gap']:.4f} | {r['mean_gap']:.4f} | "
              f"{r['fp32_agrees']} / {r['tokens']} |")
    print(f"prefill: {report['prefill']} ({report['mixed_steps']} mixed steps); decode attention: {decode_attention}; MLP activation: {report['mlp_activation']}; prompt tokens {report['prompt_tokens']}; fast alone == batched for {report['fast_alone_equals_batched']}/8, "
          f"== joined {report['fast_alone_equals_joined']}/8, == HF bf16 {report['fast_alone_equals_hf_bf16']}/8, "
          f"== replayed prefill graph {report['fast_alone_equals_replayed']}/8 ({n_replays} replays), "
          f"== replayed language-model graph {report['fast_alone_equals_lm_replayed']}/8 ({n_lm_replays} replays); "
          f"largest gaps within 1.5x HF's: {'yes' if report['max_within_1_5x_hf'] else 'no'}; "
          f"{'PASS' if ok else 'FAIL'}")
    print("| teacher-forced on HF's tokens | largest logit error vs fp32 per step, mean | largest | steps |")
    print("|---|---|---|---|")
    for name, r in report["forced_logit_error"].items():
        print(f"| {name} | {r['mean_step_max']:.4f} | {r['max']:.4f} | {r['steps']} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


def forced_logits(fast, p, tokens: list[int], *, attention: str):
    """The fast generator's decode-step logits for line *p* teacher-forced on *tokens* (its first token is taken
    as the prefill's choice), uncaptured steps with the decode attention *attention*: row t predicts tokens[t + 1]."""
    import torch
    from htrd.generation import Seq

    rec = []
    select, graphs, shipped = fast._select, fast.cuda_graphs, fast.decode_attention

    def forcing(logits, B):
        rec.append(logits[0].float().cpu())  # slot 0: the line runs alone
        select(logits, B)
        if len(rec) < len(tokens):
            fast.tok[0, 0] = tokens[len(rec)]

    fast.add([Seq(p, len(tokens), len(tokens))])
    while fast.mixed and 0 in fast._prefills.slots():
        fast.step(steps=1)  # mixed steps: the prompt's chunks (their choice of the first token is forced over)
    fast._select, fast.cuda_graphs, fast.decode_attention = forcing, False, attention
    try:
        fast.tok[0, 0] = tokens[0]
        while fast.running():
            fast.step(steps=1)
    finally:
        fast._select, fast.cuda_graphs, fast.decode_attention = select, graphs, shipped
    return torch.stack(rec)


if __name__ == "__main__":
    sys.exit(main())
