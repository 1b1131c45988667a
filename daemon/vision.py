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

:meth:`VisionTower.padded` runs the tower over patches padded to a fixed row
count: the padding is one more image, a block of its own in the attention
(flash attention's variable-length form, the block boundaries read from a
device tensor), and every other module works row by row, so the real images'
outputs do not depend on it. Its shapes depend on (images, padded rows) only:
the fast generator captures it once per such pair and replays it for lines of
any size (a collection's lines come in hundreds of sizes).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from .model import _first_line, has_flash_varlen, to_device

logger = logging.getLogger(__name__)

GRID_CACHE = 512  # image grids whose position inputs are kept on the device
# Padded rows of :meth:`VisionTower.padded`: the padding image has at least PAD_ROWS rows (a whole merge group,
# never empty), the total is a multiple of ROW_BUCKET.
PAD_ROWS = 4
ROW_BUCKET = 256
# The longest block :meth:`VisionTower.padded`'s attention is told of (flash attention's max_seqlen), where
# every image of the call has at most this many patches (a 2,000 x 500 px line). Its grid has a row of thread
# blocks per 128 positions of max_seqlen for every image and head, and those past an image's end only return:
# told the padded row count (up to ~16,000 under load), the vision attention launched ~26,000 thread blocks
# for ~1,500 with work (16 lines of 760 patches). An image past it: the call is told the row count (the fast
# generator captures such a call apart).
VISION_SPAN = 4096


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
        proj = visual.patch_embed.proj
        weight = proj.weight
        # The patch embedding (a Conv3d whose kernel is its stride, no padding) is one GEMM over the patch rows:
        # cuDNN's implicit-GEMM convolution took ~50x the GEMM's time on an H200 (~0.18 ms a line under load).
        # Swapped into HF's module, as the attention below: HF's own forward (the reference of check(), the
        # fallback, generate for over-long lines) computes the same.
        if (type(proj).__name__ == "Conv3d" and tuple(proj.kernel_size) == tuple(proj.stride)
                and not any(proj.padding) and proj.groups == 1):
            visual.patch_embed.forward = functools.partial(
                _patch_embed_forward, visual.patch_embed.forward, weight.reshape(weight.shape[0], -1), proj.bias)
        # padded() on a GPU needs flash attention's variable-length kernel; elsewhere small prefills run the
        # tower eagerly.
        self.varlen = self.own and has_flash_varlen(weight)
        self.merge = int(visual.spatial_merge_size) ** 2  # patches per image token
        self._blocks: tuple | None = None  # (cu_seqlens, span) while padded() runs
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
                    self.own = self.varlen = False
            return _split(self.visual(pixel_values, grid_thw=grid_thw))
        finally:
            self.lengths = None

    def check(self, pixel_values, grid_thw, grids, lengths) -> bool:
        """Our forward against HF's on one batch; on a difference, log it and use HF's from now on. Then, where
        :meth:`padded` is on (:attr:`varlen`), the same over padded patches: if it fails or differs beyond
        half-precision rounding, it is turned off (logged) and small prefills run the tower eagerly."""
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
            self.own = self.varlen = False
            return False
        if self.varlen:
            rows = self.rows_for(int(pixel_values.shape[0]))
            try:
                out = self.padded(*self.padded_inputs(pixel_values, grids, lengths, rows),
                                  span=self.span_for(rows, lengths))
            except RuntimeError as exc:  # e.g. a torch or GPU whose flash attention refuses these inputs
                logger.warning("the vision tower over padded patches fails here (%s): small prefills run it "
                               "eagerly", _first_line(exc))
                self.varlen = False
                return same
            k = int(ref[0].shape[0])

            def near(a, b) -> bool:  # other GEMM shapes (padded rows): half-precision rounding, not equality
                return a.shape == b.shape and bool((a.float() - b.float()).norm() <= 0.02 * b.float().norm())

            if not (out.shape[0] == 1 + len(ref[1]) and all(near(a[:k], b) for a, b in zip(out, [ref[0], *ref[1]]))):
                logger.warning("the vision tower over padded patches (flash attention, variable lengths) differs "
                               "from HF's forward: small prefills run it eagerly")
                self.varlen = False
        return same

    # --------------------------------------------------------------- padded rows
    def rows_for(self, patches: int) -> int:
        """The padded row count of :meth:`padded` for *patches* real patch rows."""
        return -(-(patches + PAD_ROWS) // ROW_BUCKET) * ROW_BUCKET

    def padded_inputs(self, pixel_values, grids, lengths: list[int], rows: int, into: list | None = None,
                      blocks: int | None = None) -> list:
        """:meth:`padded`'s arguments for the images of *grids* (*lengths* patches per frame) padded to *rows*:
        [patches, position embeddings, rotary cos, rotary sin], zeros past the images, and the attention
        blocks' boundaries (int32 on the device: 0, each image's end, *rows*, then *rows* again up to *blocks*
        frames -- empty blocks, so that any number of images up to *blocks* has the same shapes). *into*: an
        earlier result (a captured graph's static inputs) to write the images into instead; its rows past them
        keep what they held (finite values that only the padding image reads)."""
        torch = self.torch
        parts = [pixel_values, *self.grid_inputs(grids)]
        bounds = [0]
        for length in lengths:
            bounds.append(bounds[-1] + int(length))
        bounds += [rows] * (1 + max(0, (blocks or 0) - len(lengths)))
        cu = to_device(torch.tensor(bounds, dtype=torch.int32), pixel_values.device)
        if into is None:
            into = [t.new_zeros((rows, *t.shape[1:])) for t in parts] + [cu]
        else:
            into[-1].copy_(cu)
        for buf, t in zip(into, parts):
            buf[: t.shape[0]].copy_(t)
        return into

    def span_for(self, rows: int, lengths: Sequence[int] = ()) -> int:
        """The longest block :meth:`padded` over *rows* rows may be told of for images of *lengths* patches
        (a bound on every block, the padding's too): ``min(rows, VISION_SPAN)`` where every image fits, else
        *rows*. A captured graph bakes it in: the fast generator keeps its graphs per (rows, span)."""
        span = max(VISION_SPAN, ROW_BUCKET + PAD_ROWS)  # the padding image is shorter than ROW_BUCKET + PAD_ROWS
        return rows if any(int(n) > span for n in lengths) else min(rows, span)

    def padded(self, pixel_values, pos, cos, sin, cu_seqlens, span: int | None = None):
        """HF's modules over patch rows padded with one more image (see the module docstring): image tokens
        and deepstack features stacked, (1 + deepstack layers, rows / merge, H); the real images' are the
        first patches / merge rows of each. *span*: no block (image) is longer (:meth:`span_for`; default the
        row count). Shapes depend on rows and the boundaries' length only; nothing waits for the GPU."""
        vis = self.visual
        self._blocks = (cu_seqlens, int(pixel_values.shape[0]) if span is None else int(span))
        try:
            h = vis.patch_embed(pixel_values)
            image, deepstack = self._blocks_forward(h + pos.to(h.dtype), cos, sin)
        finally:
            self._blocks = None
        return self.torch.stack([image, *deepstack])

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
                # Pinned non-blocking copies: a blocking one would wait for every kernel queued (decode steps).
                pos = (vis.pos_embed(to_device(idx, dev)) * to_device(w, dev)[:, :, None]).sum(1)
                cos, sin = vis.rotary_pos_emb(torch.empty((0,), dtype=vis.patch_embed.proj.weight.dtype, device=dev),
                                              to_device(position_ids, dev))
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
        return self._blocks_forward(h + pos.to(h.dtype), cos, sin)

    def _blocks_forward(self, h, cos, sin):
        vis = self.visual
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


def _patch_embed_forward(conv_forward, w, b, hidden_states):
    """HF's patch embedding (``Qwen3VLVisionPatchEmbed.forward``): each row of patch values (channels x frames x
    patch x patch, the Conv3d kernel's order) times the kernel *w* (out, kernel size) plus the bias *b* -- the
    convolution, whose kernel is its stride, as one GEMM. Rows of another size: the module's own forward."""
    import torch

    if hidden_states.shape[-1] != w.shape[1]:
        return conv_forward(hidden_states)
    return torch.nn.functional.linear(hidden_states.reshape(-1, w.shape[1]).to(w.dtype), w, b)


def _attention_forward(tower, mod, hidden_states, cu_seqlens=None, position_embeddings=None, max_seqlen=None,
                       **kwargs):
    """Qwen3-VL vision attention (HF's non-flash path) with equal-length images batched. The images' patch
    counts come from the host during a prefill (``tower.lengths``), else from *cu_seqlens* (a wait for the GPU
    in every layer); in :meth:`VisionTower.padded`, one variable-length flash attention call over the blocks
    whose boundaries are on the device."""
    import torch

    n_tok = hidden_states.shape[0]
    heads = mod.num_heads
    q, k, v = mod.qkv(hidden_states).reshape(n_tok, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = tower.rope(q, k, cos, sin)  # (n_tok, heads, d)
    d = q.shape[-1]
    if tower._blocks is not None:  # VisionTower.padded: the block boundaries are a device tensor
        bounds, span = tower._blocks
        if q.is_cuda:
            o = torch.ops.aten._flash_attention_forward(q, k, v, bounds, bounds, span, span, 0.0, False, False,
                                                        scale=mod.scaling)[0]
            return mod.proj(o.reshape(n_tok, heads * d))
        lengths = [n for n in (bounds[1:] - bounds[:-1]).tolist() if n]  # on the CPU (tests): a loop over the blocks
    else:
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
