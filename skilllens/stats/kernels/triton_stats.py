"""Fused one-pass per-neuron statistics kernel (Triton).

``fused_partials(x, mask, hist)`` reads an activation block ``x: [N, d]`` once and returns the
same partials as :func:`skilllens.stats.batch_partials` (count, mean, m2, min, max, sum_abs,
n_pos, n_nonfinite as float64 ``[d]``, and ``hist`` as int64 ``[d, bins + 2]``).

Layout: the grid is ``(neuron blocks, token blocks)``. Each program walks its token range in
``[BLOCK_N, BLOCK_D]`` tiles with float32 per-neuron accumulators:

* moments: each tile is reduced two-pass (tile mean, then squared deviations) in coordinates
  shifted by a per-neuron ``shift`` (the mean of the first tile holding data for that neuron),
  and merged into the running (count, mean, M2) with Chan's formula, so a large common offset
  (``1e4 + N(0, 1)``) does not cancel;
* min / max, ``sum |x|`` (Kahan-compensated), ``n_pos``, ``n_nonfinite``;
* histogram: ``atomic_add`` of ones into an int32 ``[d, bins + 2]`` buffer.

Each program writes its partials to a small float32 buffer ``[9, n_token_blocks, d]``; these are
combined exactly in float64 with torch (the k-way form of Chan's formula). Neurons whose float32
partials overflowed (``|x|`` beyond ~1e18, where squares exceed the float32 range) are recomputed
in float64 with torch (reading only those columns), so the result never silently loses them.

On CPU tensors the kernel runs only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from skilllens.errors import SkillLensError
from skilllens.stats.partials import (PARTIAL_KEYS, HistogramSpec, _empty_partials, as_rows,
                                      float64_partials)

# rows of the partial buffer
_CNT, _SHIFT, _MEAN, _M2, _MIN, _MAX, _ABS, _POS, _BAD = range(9)
_MAX_ROWS_PER_PROGRAM = 1 << 22  # float32 counts stay exact (< 2**24)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


def _stats_kernel(x_ptr, mask_ptr, lo_ptr, scale_ptr, hist_ptr, part_ptr,
                  N, D, stride_n, stride_d, tiles_per_prog, bins,
                  HAS_MASK: tl.constexpr, HAS_HIST: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: neurons ``[pid_d * BLOCK_D, +BLOCK_D)`` x its range of token tiles."""
    pid_d = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_tb = tl.num_programs(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    col_off = cols.to(tl.int64) * stride_d

    cnt = tl.zeros([BLOCK_D], dtype=tl.float32)
    shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    mean = tl.zeros([BLOCK_D], dtype=tl.float32)  # relative to shift
    m2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    vmin = tl.full([BLOCK_D], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_D], float("-inf"), tl.float32)
    sabs = tl.zeros([BLOCK_D], dtype=tl.float32)
    sabs_c = tl.zeros([BLOCK_D], dtype=tl.float32)  # Kahan compensation
    npos = tl.zeros([BLOCK_D], dtype=tl.float32)
    nbad = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_HIST:
        lo = tl.load(lo_ptr + cols, mask=col_ok, other=0.0)
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=1.0)
        hrow = cols.to(tl.int64) * (bins + 2) + 1
        ones = tl.full([BLOCK_N, BLOCK_D], 1, tl.int32)

    row0 = pid_t * tiles_per_prog * BLOCK_N
    for t in range(0, tiles_per_prog):
        rows = row0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        if HAS_MASK:
            row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        inb = row_ok[:, None] & col_ok[None, :]
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_n + col_off[None, :]
        x = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)
        fin = tl.abs(x) <= _FLT_MAX  # False for NaN and +-inf
        valid = inb & fin
        nbad += tl.sum((inb & (~fin)).to(tl.float32), axis=0)
        xv = tl.where(valid, x, 0.0)

        c = tl.sum(valid.to(tl.float32), axis=0)
        inv_c = 1.0 / tl.maximum(c, 1.0)
        # neurons without data so far take this tile's mean as their shift
        shift = tl.where(cnt == 0.0, tl.sum(xv, axis=0) * inv_c, shift)
        y = tl.where(valid, x - shift[None, :], 0.0)
        tmean = tl.sum(y, axis=0) * inv_c
        dev = tl.where(valid, y - tmean[None, :], 0.0)
        tm2 = tl.sum(dev * dev, axis=0)
        n = cnt + c
        delta = tmean - mean
        frac = c / tl.maximum(n, 1.0)
        mean = mean + delta * frac
        m2 = m2 + tm2 + delta * delta * cnt * frac
        cnt = n

        vmin = tl.minimum(vmin, tl.min(tl.where(valid, x, float("inf")), axis=0))
        vmax = tl.maximum(vmax, tl.max(tl.where(valid, x, float("-inf")), axis=0))
        ya = tl.sum(tl.abs(xv), axis=0) - sabs_c
        tsum = sabs + ya
        sabs_c = (tsum - sabs) - ya
        sabs = tsum
        npos += tl.sum((xv > 0.0).to(tl.float32), axis=0)

        if HAS_HIST:
            b = tl.floor((x - lo[None, :]) * scale[None, :])
            b = tl.minimum(tl.maximum(b, -1.0), bins * 1.0)
            tl.atomic_add(hist_ptr + (hrow[None, :] + b.to(tl.int64)), ones, mask=valid,
                          sem="relaxed")

    stride_k = n_tb * D
    out = part_ptr + pid_t * D + cols
    tl.store(out + 0 * stride_k, cnt, mask=col_ok)
    tl.store(out + 1 * stride_k, shift, mask=col_ok)
    tl.store(out + 2 * stride_k, mean, mask=col_ok)
    tl.store(out + 3 * stride_k, m2, mask=col_ok)
    tl.store(out + 4 * stride_k, vmin, mask=col_ok)
    tl.store(out + 5 * stride_k, vmax, mask=col_ok)
    tl.store(out + 6 * stride_k, sabs, mask=col_ok)
    tl.store(out + 7 * stride_k, npos, mask=col_ok)
    tl.store(out + 8 * stride_k, nbad, mask=col_ok)


_KERNELS: dict[bool, object] = {}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel(interpret: bool):
    """The jitted kernel, built lazily so that ``TRITON_INTERPRET`` is read at first use."""
    if interpret not in _KERNELS:
        _KERNELS[interpret] = triton.jit(_stats_kernel)
    return _KERNELS[interpret]


def _grid_shape(n: int, d: int, block_n: int, block_d: int, device: torch.device,
                n_token_blocks: int | None) -> tuple[int, int]:
    """(n_token_blocks, tiles_per_program): enough programs to fill the GPU, few partials."""
    n_tiles = triton.cdiv(n, block_n)
    if n_token_blocks is None:
        if device.type == "cuda":
            target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
        else:
            target = 1  # interpreter: fewest programs is fastest
        n_token_blocks = triton.cdiv(target, triton.cdiv(d, block_d))
    n_token_blocks = max(n_token_blocks, triton.cdiv(n, _MAX_ROWS_PER_PROGRAM))
    n_token_blocks = max(1, min(n_token_blocks, n_tiles))
    tiles = triton.cdiv(n_tiles, n_token_blocks)
    return triton.cdiv(n_tiles, tiles), tiles


def _combine(part: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact float64 combination of per-token-block partials ``[9, T, d]`` -> ``[d]`` each."""
    p = part.double()
    cnt_i = p[_CNT]
    has = cnt_i > 0
    mean_i = torch.where(has, p[_SHIFT] + p[_MEAN], 0.0)
    count = cnt_i.sum(0)
    ref = mean_i[has.to(torch.int8).argmax(0), torch.arange(p.shape[2], device=p.device)]
    mean = ref + (cnt_i * (mean_i - ref)).sum(0) / count.clamp(min=1)
    dm = torch.where(has, mean_i - mean, 0.0)
    m2 = torch.where(has, p[_M2], 0.0).sum(0) + (cnt_i * dm * dm).sum(0)
    return {"count": count, "mean": torch.where(count > 0, mean, 0.0), "m2": m2.clamp(min=0),
            "min": p[_MIN].amin(0), "max": p[_MAX].amax(0), "sum_abs": p[_ABS].sum(0),
            "n_pos": p[_POS].sum(0), "n_nonfinite": p[_BAD].sum(0)}


def fused_partials(x: torch.Tensor, mask: torch.Tensor | None = None,
                   hist: HistogramSpec | None = None, *, block_n: int = 32,
                   block_d: int | None = None, n_token_blocks: int | None = None,
                   num_warps: int = 4) -> dict[str, torch.Tensor]:
    """Partials of ``x: [..., d]`` (bf16/fp16/fp32) over rows where ``mask: [...]`` is True.

    Returns the dict of :func:`skilllens.stats.batch_partials` on ``x.device``. The keyword
    arguments tune the launch (block sizes are powers of two; tests use tiny ones). float64
    input is not narrowed: it goes to the shared float64 path.
    """
    x = x.detach()
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        x = x.to(torch.float32)
    x2, mask = as_rows(x, mask)
    d = x2.shape[1]
    if mask is not None:
        mask = mask.to(torch.uint8)
    n = x2.shape[0]
    if x2.dtype == torch.float64:
        return float64_partials(x2, mask, hist)
    interpret = _interpret()
    if x.device.type != "cuda" and not interpret:
        raise SkillLensError(f"the Triton statistics kernel needs a CUDA tensor (got "
                             f"{x.device}); set TRITON_INTERPRET=1 to run it on the CPU")
    if n == 0 or d == 0:
        return _empty_partials(d, x.device, hist)

    if block_d is None:
        block_d = 128 if x.device.type == "cuda" else min(128, triton.next_power_of_2(d))
    n_tb, tiles = _grid_shape(n, d, block_n, block_d, x.device, n_token_blocks)
    part = torch.empty(9, n_tb, d, dtype=torch.float32, device=x.device)
    if hist is not None:
        lo = hist.lo.to(x.device, torch.float32).reshape(d).contiguous()
        hi = hist.hi.to(x.device, torch.float32).reshape(d).contiguous()
        scale = (hist.bins / (hi - lo)).contiguous()  # same float32 formula as histogram_counts
        hbuf = torch.zeros(d, hist.bins + 2, dtype=torch.int32, device=x.device)
    else:
        lo = scale = hbuf = part  # unused pointers
    mptr = mask if mask is not None else part
    grid = (triton.cdiv(d, block_d), n_tb)
    _kernel(interpret)[grid](
        x2, mptr, lo, scale, hbuf, part, n, d, x2.stride(0), x2.stride(1), tiles,
        hist.bins if hist is not None else 0,
        HAS_MASK=mask is not None, HAS_HIST=hist is not None,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    out = _combine(part)
    if hist is not None:
        out["hist"] = hbuf.to(torch.int64)
    # float32 overflow (|x| >~ 1e18): recompute those neurons exactly in float64 (rare)
    p = part[[_SHIFT, _MEAN, _M2, _ABS]]
    bad = ((part[_CNT] > 0) & ~torch.isfinite(p).all(0)).any(0)
    if bool(bad.any()):
        cols = bad.nonzero().squeeze(1)
        ref = float64_partials(x2.index_select(1, cols), mask)
        for k in PARTIAL_KEYS:
            out[k][cols] = ref[k]
    return out
