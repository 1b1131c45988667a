"""Qwen3-VL's vision tower as the fast generator runs it: nothing in it waits for the GPU.

HF's ``Qwen3VLVisionModel.forward`` derives, from ``grid_thw`` on every call,
the position-embedding interpolation, the 2-D rotary angles and the attention
blocks (``cu_seqlens``), and its attention asks the GPU for the block sizes in
every layer (``.tolist()``). Line images of a collection come in a few
recurring shapes, so :class:`VisionTower` computes those per image grid once
(with HF's own helpers, then cached on the device) and runs HF's modules --
patch embedding, blocks, deepstack mergers, merger -- on them, the block sizes
given from the host. The result is the same as HF's forward (same modules,
same inputs; :meth:`VisionTower.check` compares the two at warm-up and falls
back to HF's forward on any difference, e.g. a transformers release that
changed the helpers), and it can be captured in a CUDA graph.

Attention runs one SDPA call per run of equal-sized images (HF's non-flash
path loops over images: 27 layers x 64 lines = 1,728 small calls per prefill).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

GRID_CACHE = 512  # image grids whose position inputs are kept on the device


class VisionTower:
    """HF's vision tower (``model.model.visual``) with per-grid inputs cached and batched attention."""

    def __init__(self, visual, *, compile: bool = False) -> None:
        import torch
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

        self.torch = torch
        self.visual = visual
        # HF's rotary for q and k: ~14 small ops a layer eagerly, one fused kernel compiled (any patch count).
        self.rope = (torch.compile(apply_rotary_pos_emb_vision, dynamic=True, fullgraph=True) if compile
                     else apply_rotary_pos_emb_vision)
        self.lengths: list[int] | None = None  # patches per image while a forward runs (host-known)
        self._grids: dict[tuple[int, int, int], tuple] = {}
        self.own = _helpers() is not None  # False: HF's forward (still with batched attention)
        n = 0
        for mod in visual.modules():
            if type(mod).__name__.endswith("VisionAttention") and hasattr(mod, "qkv"):
                mod.forward = functools.partial(_attention_forward, self, mod)
                n += 1
        logger.debug("vision attention batched in %d layers", n)

    def __call__(self, pixel_values, grid_thw, grids: Sequence[tuple[int, int, int]], lengths: list[int]):
        """(image tokens, deepstack features) of the images whose patches are *pixel_values*; *grids* and
        *lengths* (patches per frame) are *grid_thw* as known on the host."""
        self.lengths = lengths
        try:
            if self.own:
                try:
                    return self._forward(pixel_values, grids)
                except _HelpersChanged as exc:
                    logger.warning("transformers' vision helpers do not take what they did (%s): using HF's "
                                   "forward, slower and without prefill graphs", exc)
                    self.own = False
            return _split(self.visual(pixel_values, grid_thw=grid_thw))
        finally:
            self.lengths = None

    def check(self, pixel_values, grid_thw, grids, lengths) -> bool:
        """Our forward against HF's on one batch; on a difference, log it and use HF's from now on."""
        if not self.own:
            return False
        ours = self(pixel_values, grid_thw, grids, lengths)
        if not self.own:  # the helpers failed (logged)
            return False
        self.own = False
        try:
            ref = self(pixel_values, grid_thw, grids, lengths)
        finally:
            self.own = True

        def close(a, b) -> bool:  # the same kernels on the same inputs: equal, bar a GEMM's reduction order
            d = (a.float() - b.float()).abs().max()
            return a.shape == b.shape and bool(d <= 1e-3 * (1 + b.float().abs().max()))

        same = len(ours[1]) == len(ref[1]) and all(
            close(a, b) for a, b in zip([ours[0], *ours[1]], [ref[0], *ref[1]]))
        if not same:
            logger.warning("the vision tower with cached grid inputs differs from HF's forward (transformers "
                           "changed?): using HF's forward, slower and without prefill graphs")
            self.own = False
        return same

    def grid_inputs(self, grids: Sequence[tuple[int, int, int]]):
        """Position embeddings and rotary (cos, sin) for images of *grids*, in order (cached per grid)."""
        parts = [self._grid(tuple(int(v) for v in g)) for g in grids]
        if len(parts) == 1:
            return parts[0]
        return tuple(self.torch.cat(p) for p in zip(*parts))

    def _grid(self, g: tuple[int, int, int]):
        got = self._grids.get(g)
        if got is not None:
            return got
        torch = self.torch
        vu = _helpers()
        vis = self.visual
        dev = vis.patch_embed.proj.weight.device
        # The index arithmetic on the CPU (HF's helpers read grid values back: on the GPU, a wait for every
        # queued kernel, once per new grid), then only the embedding lookup on the device.
        thw = torch.tensor([g], dtype=torch.long)
        with torch.inference_mode():
            try:
                idx, w = vu.get_vision_interpolation_indices_and_weights(
                    thw, num_grid_per_side=vis.num_grid_per_side, mode=vis.interpolation_mode,
                    align_corners=vis.interpolation_align_corners, spatial_merge_size=vis.config.spatial_merge_size)
                position_ids = vu.get_vision_position_ids(thw, vis.spatial_merge_size)
                # Non-blocking copies: a blocking one would wait for every kernel queued (decode steps).
                pos = (vis.pos_embed(idx.to(dev, non_blocking=True)) * w.to(dev, non_blocking=True)[:, :, None]).sum(1)
                cos, sin = vis.rotary_pos_emb(torch.empty((0,), dtype=vis.patch_embed.proj.weight.dtype, device=dev),
                                              position_ids.to(dev, non_blocking=True))
            except (AttributeError, TypeError, ValueError) as exc:  # a release that changed them or the modules
                raise _HelpersChanged(f"{type(exc).__name__}: {exc}") from exc
        if len(self._grids) >= GRID_CACHE:
            self._grids.clear()
        got = self._grids[g] = (pos, cos, sin)
        return got

    def _forward(self, pixel_values, grids):
        """HF's ``Qwen3VLVisionModel.forward`` with the grid-derived inputs from the cache."""
        vis = self.visual
        pos, cos, sin = self.grid_inputs(grids)
        h = vis.patch_embed(pixel_values)
        h = h + pos.to(h.dtype)
        deepstack = []
        for i, blk in enumerate(vis.blocks):
            h = blk(h, cu_seqlens=None, position_embeddings=(cos, sin))
            if i in vis.deepstack_visual_indexes:
                deepstack.append(vis.deepstack_merger_list[vis.deepstack_visual_indexes.index(i)](h))
        return vis.merger(h), deepstack


class _HelpersChanged(Exception):
    """transformers' vision helpers exist but no longer take the arguments HF's forward gave them here."""


def _helpers():
    """transformers' vision helpers (``transformers.vision_utils``), or None where this release lacks them."""
    try:
        from transformers import vision_utils as vu
    except ImportError:
        return None
    names = ("get_vision_interpolation_indices_and_weights", "get_vision_position_ids")
    return vu if all(hasattr(vu, n) for n in names) else None


def _split(out):
    if hasattr(out, "pooler_output"):  # transformers >= 5.2x: a model output
        return out.pooler_output, out.deepstack_features
    return out[0], out[1]  # earlier: (merged image tokens, deepstack features)


def _attention_forward(tower, mod, hidden_states, cu_seqlens=None, position_embeddings=None, max_seqlen=None,
                       **kwargs):
    """Qwen3-VL vision attention (HF's non-flash path) with equal-length images batched. The images' patch
    counts come from the host during a prefill (``tower.lengths``), else from *cu_seqlens* (a wait for the GPU
    in every layer)."""
    import torch

    n_tok = hidden_states.shape[0]
    heads = mod.num_heads
    q, k, v = mod.qkv(hidden_states).reshape(n_tok, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = tower.rope(q, k, cos, sin)  # (n_tok, heads, d)
    d = q.shape[-1]
    lengths = tower.lengths
    if lengths is None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outs = []
    start = i = 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        cnt, length = j - i, lengths[i]
        sl = slice(start, start + cnt * length)
        qq, kk, vv = (t[sl].reshape(cnt, length, heads, d).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, scale=mod.scaling)
        outs.append(o.transpose(1, 2).reshape(cnt * length, heads * d))
        start += cnt * length
        i = j
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return mod.proj(out)
