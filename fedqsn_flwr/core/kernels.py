"""Compiled CPU kernels for NF-k quantization and bit packing (numba).

:mod:`fedqsn_flwr.core.quantization` defines the quantizer with plain tensor code (the
*reference*). These kernels compute the same codes, scales and packed bytes, bit
for bit, in two passes over the data instead of a dozen: the reference's
``torch.bucketize`` alone costs about ten times a ``clone()`` of the tensor, which
makes it the bottleneck of building proxies for large models.

Exactness rests on doing the same float32 operations in the same order: the
block scale is the absolute maximum, a value is divided by its block's scale in
float32, and its code is the number of codebook midpoints strictly below the
quotient (``torch.bucketize`` with ``right=False``). The tests compare both paths
on every bit width.

When numba is not installed (:data:`AVAILABLE` is False) callers use the
reference path.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

try:
    from numba import njit, prange

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without numba
    AVAILABLE = False

__all__ = [
    "AVAILABLE",
    "block_absmax",
    "dequantize_scatter",
    "dequantize_unpack",
    "quantize_pack",
    "similarity_sums",
]

if AVAILABLE:

    @njit(parallel=True, cache=True)
    def _block_absmax(flat: np.ndarray, block_size: int, out: np.ndarray) -> None:
        numel = flat.size
        for block in prange(out.size):
            start = block * block_size
            end = min(start + block_size, numel)
            peak = np.float32(0.0)
            for i in range(start, end):
                value = abs(flat[i])
                if not value < np.inf:  # NaN or Inf: flag the block, caller raises
                    peak = np.float32(np.inf)
                    break
                if value > peak:
                    peak = value
            out[block] = peak

    @njit(inline="always")
    def _nf_code(
        x: float, cell_counts: np.ndarray, bounds: np.ndarray, half_cells: float, num_cells: int
    ) -> int:
        # A uniform grid finer than half the smallest gap between midpoints
        # guesses the count of midpoints below x to within one (float rounding
        # can land x in a neighbouring cell); two comparisons with the
        # neighbouring midpoints make it exact.
        cell = min(max(int((x + np.float32(1.0)) * half_cells), 0), num_cells - 1)
        guess = cell_counts[cell]
        return guess + (x > bounds[guess + 1]) - (x <= bounds[guess])

    @njit(parallel=True, cache=True)
    def _quantize_pack(
        flat: np.ndarray,
        scales: np.ndarray,
        cell_counts: np.ndarray,
        bounds: np.ndarray,
        bit_width: int,
        block_size: int,
        out: np.ndarray,
    ) -> None:
        numel = flat.size
        num_cells = cell_counts.size
        half_cells = np.float32(num_cells / 2)
        if bit_width == 4 and block_size % 2 == 0:
            # The common case: blocks start on a byte, so a thread takes whole
            # blocks and packs two codes per byte with no per-value bookkeeping.
            for block in prange(scales.size):
                scale = scales[block]
                if scale <= 0:
                    scale = np.float32(1.0)
                start = block * block_size
                end = min(start + block_size, numel)
                for j in range(start >> 1, (end + 1) >> 1):
                    i = 2 * j
                    high = _nf_code(flat[i] / scale, cell_counts, bounds, half_cells, num_cells)
                    low = 0
                    if i + 1 < end:
                        low = _nf_code(
                            flat[i + 1] / scale, cell_counts, bounds, half_cells, num_cells
                        )
                    out[j] = np.uint8((high << 4) | low)
            return
        # Eight codes of k bits fill exactly k bytes, so groups of eight codes are
        # independent and can be packed in parallel.
        num_groups = (numel + 7) // 8
        for group in prange(num_groups):
            acc = np.uint64(0)
            # One integer division per group, not per value: it costs more than
            # the rest of the work on a value.
            block = (group * 8) // block_size
            boundary = (block + 1) * block_size
            for j in range(8):
                i = group * 8 + j
                code = 0
                if i < numel:
                    if i >= boundary:
                        block += 1
                        boundary += block_size
                    scale = scales[block]
                    if scale <= 0:
                        scale = np.float32(1.0)
                    code = _nf_code(flat[i] / scale, cell_counts, bounds, half_cells, num_cells)
                acc = (acc << np.uint64(bit_width)) | np.uint64(code)
            base = group * bit_width
            for t in range(bit_width):
                if base + t < out.size:
                    shift = np.uint64(8 * (bit_width - 1 - t))
                    out[base + t] = np.uint8((acc >> shift) & np.uint64(0xFF))

    @njit(inline="always")
    def _code(packed: np.ndarray, bit_width: int, i: int) -> int:
        # Code i sits at bit i * k of the MSB-first stream and spans at most two bytes.
        bit = i * bit_width
        byte = bit >> 3
        word = np.int64(packed[byte]) << 8
        if byte + 1 < packed.size:
            word |= np.int64(packed[byte + 1])
        return (word >> (16 - bit_width - (bit & 7))) & ((1 << bit_width) - 1)

    @njit(cache=True)
    def _decode_run(
        packed: np.ndarray,
        scales: np.ndarray,
        levels: np.ndarray,
        bit_width: int,
        block_size: int,
        i: int,
        count: int,
        out: np.ndarray,
        pos: int,
    ) -> None:
        """Decode codes ``i .. i+count-1`` into ``out[pos .. pos+count-1]``."""
        block = i // block_size
        while count > 0:
            run = min(count, (block + 1) * block_size - i)
            scale = scales[block]
            if bit_width == 4:
                # Two codes per byte: a byte at a time once i is even, so the
                # loop has no per-value shift to compute (several times faster).
                if i & 1:
                    out[pos] = levels[packed[i >> 1] & 15] * scale
                    i += 1
                    pos += 1
                    run -= 1
                    count -= 1
                first = i >> 1
                for j in range(run >> 1):
                    byte = packed[first + j]
                    out[pos + 2 * j] = levels[byte >> 4] * scale
                    out[pos + 2 * j + 1] = levels[byte & 15] * scale
                done = run & ~1
                if run & 1:
                    out[pos + done] = levels[packed[(i + done) >> 1] >> 4] * scale
            else:
                for j in range(run):
                    out[pos + j] = levels[_code(packed, bit_width, i + j)] * scale
            i += run
            pos += run
            count -= run
            block += 1

    @njit(parallel=True, cache=True)
    def _dequantize_unpack(
        packed: np.ndarray,
        scales: np.ndarray,
        levels: np.ndarray,
        bit_width: int,
        block_size: int,
        out: np.ndarray,
    ) -> None:
        numel = out.size
        chunk = 1 << 14
        for c in prange((numel + chunk - 1) // chunk):
            start = c * chunk
            _decode_run(
                packed,
                scales,
                levels,
                bit_width,
                block_size,
                start,
                min(chunk, numel - start),
                out,
                start,
            )

    # The scatter kernels decode the visible slice (outer, len(units), inner), whose
    # codes are in row-major order, into the dense (outer, num_units, inner) output:
    # segment (o, v) is `inner` consecutive codes that belong at unit units[v] of
    # row o. Hidden units get zeros, so the output needs no zeroing first.

    @njit(parallel=True, cache=True)
    def _scatter_long(
        packed: np.ndarray,
        scales: np.ndarray,
        levels: np.ndarray,
        bit_width: int,
        block_size: int,
        outer: int,
        units: np.ndarray,
        hidden: np.ndarray,
        num_units: int,
        inner: int,
        out: np.ndarray,
    ) -> None:
        # long segments (e.g. output units of a Linear): one thread per segment
        visible = units.size
        for segment in prange(outer * visible):
            o = segment // visible
            pos = (o * num_units + units[segment - o * visible]) * inner
            _decode_run(
                packed, scales, levels, bit_width, block_size, segment * inner, inner, out, pos
            )
        for segment in prange(outer * hidden.size):
            o = segment // hidden.size
            base = (o * num_units + hidden[segment - o * hidden.size]) * inner
            for k in range(inner):
                out[base + k] = np.float32(0.0)

    @njit(parallel=True, cache=True)
    def _scatter_short(
        packed: np.ndarray,
        scales: np.ndarray,
        levels: np.ndarray,
        bit_width: int,
        block_size: int,
        outer: int,
        units: np.ndarray,
        hidden: np.ndarray,
        num_units: int,
        inner: int,
        out: np.ndarray,
    ) -> None:
        # short segments (e.g. input units of a Linear): rows, a chunk of rows per
        # thread; a row's codes are decoded in one run, then placed unit by unit
        visible = units.size
        length = visible * inner
        chunks = min(outer, 256)
        for c in prange(chunks):
            row = np.empty(length, dtype=np.float32)
            for o in range(c * outer // chunks, (c + 1) * outer // chunks):
                _decode_run(
                    packed, scales, levels, bit_width, block_size, o * length, length, row, 0
                )
                dense = out[o * num_units * inner : (o + 1) * num_units * inner]
                if inner == 1:  # the common case, as a plain gather (2-3x faster)
                    for v in range(visible):
                        dense[units[v]] = row[v]
                    for h in range(hidden.size):
                        dense[hidden[h]] = np.float32(0.0)
                else:
                    for v in range(visible):
                        start = units[v] * inner
                        dense[start : start + inner] = row[v * inner : (v + 1) * inner]
                    for h in range(hidden.size):
                        start = hidden[h] * inner
                        dense[start : start + inner] = np.float32(0.0)

    @njit(parallel=True, cache=True)
    def _similarity_sums(
        packed: np.ndarray,
        scales: np.ndarray,
        levels: np.ndarray,
        bit_width: int,
        block_size: int,
        outer: int,
        units: np.ndarray,
        hidden: np.ndarray,
        num_units: int,
        inner: int,
        factor: float,
        reference: np.ndarray,
        out: np.ndarray,
    ) -> None:
        # Walks the codes as the scatter kernels do, but instead of writing the
        # dense tensor it sums, per row o, a.b, a.a and (a-b)^2 in float64 against
        # the dense reference b (a = decoded value * factor; a = 0 at hidden units).
        visible = units.size
        for o in prange(outer):
            i = o * visible * inner
            block = i // block_size
            boundary = (block + 1) * block_size
            row = o * num_units
            dot = 0.0
            own = 0.0
            gap = 0.0
            for v in range(visible):
                base = (row + units[v]) * inner
                for k in range(inner):
                    if i >= boundary:
                        block += 1
                        boundary += block_size
                    if bit_width == 4:
                        code = (np.int64(packed[i >> 1]) >> (((i & 1) ^ 1) << 2)) & 15
                    else:
                        code = _code(packed, bit_width, i)
                    a = np.float64(levels[code] * scales[block]) * factor
                    b = np.float64(reference[base + k])
                    dot += a * b
                    own += a * a
                    gap += (a - b) * (a - b)
                    i += 1
            for h in range(hidden.size):
                base = (row + hidden[h]) * inner
                for k in range(inner):
                    b = np.float64(reference[base + k])
                    gap += b * b
            out[o, 0] = dot
            out[o, 1] = own
            out[o, 2] = gap

    # Starting the thread pool costs ~10 us per call: more than the whole work
    # on the small tensors of small models (biases, first layers).
    _block_absmax_serial = njit(cache=True)(_block_absmax.py_func)
    _quantize_pack_serial = njit(cache=True)(_quantize_pack.py_func)
    _dequantize_unpack_serial = njit(cache=True)(_dequantize_unpack.py_func)
    _scatter_long_serial = njit(cache=True)(_scatter_long.py_func)
    _scatter_short_serial = njit(cache=True)(_scatter_short.py_func)
    _similarity_sums_serial = njit(cache=True)(_similarity_sums.py_func)

#: Below this many values the kernels run on one thread.
PARALLEL_THRESHOLD = 1 << 16


def block_absmax(flat: np.ndarray, block_size: int) -> np.ndarray:
    """Absolute maximum of every block of a flat float32 array (Inf marks NaN/Inf)."""
    out = np.empty((flat.size + block_size - 1) // block_size, dtype=np.float32)
    kernel = _block_absmax if flat.size >= PARALLEL_THRESHOLD else _block_absmax_serial
    kernel(flat, block_size, out)
    return out


@cache
def _search_tables(midpoints: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(cell_counts, bounds)`` for the grid search of :func:`quantize_pack`.

    ``cell_counts[c]`` counts the midpoints below the start of cell ``c`` of a
    uniform grid over [-1, 1]; ``bounds`` is the midpoints framed by -inf and +inf.
    """
    mids = np.asarray(midpoints, dtype=np.float32)
    smallest_gap = float(np.diff(mids.astype(np.float64)).min()) if mids.size > 1 else 2.0
    num_cells = 2 ** math.ceil(math.log2(4.0 / smallest_gap))
    starts = -1.0 + 2.0 * np.arange(num_cells, dtype=np.float64) / num_cells
    cell_counts = np.searchsorted(mids.astype(np.float64), starts, side="left").astype(np.int64)
    bounds = np.concatenate([[-np.inf], mids, [np.inf]]).astype(np.float32)
    return cell_counts, bounds


def quantize_pack(
    flat: np.ndarray, scales: np.ndarray, midpoints: np.ndarray, bit_width: int, block_size: int
) -> np.ndarray:
    """NF-k codes of a flat float32 array, bit-packed MSB first."""
    cell_counts, bounds = _search_tables(tuple(float(m) for m in midpoints))
    out = np.empty((flat.size * bit_width + 7) // 8, dtype=np.uint8)
    kernel = _quantize_pack if flat.size >= PARALLEL_THRESHOLD else _quantize_pack_serial
    kernel(flat, scales, cell_counts, bounds, bit_width, block_size, out)
    return out


def dequantize_unpack(
    packed: np.ndarray,
    scales: np.ndarray,
    levels: np.ndarray,
    bit_width: int,
    block_size: int,
    count: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of :func:`quantize_pack`: ``count`` float32 values."""
    out = _output(out, count)
    kernel = _dequantize_unpack if count >= PARALLEL_THRESHOLD else _dequantize_unpack_serial
    kernel(packed, scales, levels, bit_width, block_size, out)
    return out


def dequantize_scatter(
    packed: np.ndarray,
    scales: np.ndarray,
    levels: np.ndarray,
    bit_width: int,
    block_size: int,
    shape: tuple[int, ...],
    axis: int,
    units: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The dense float32 tensor of ``shape`` whose ``units`` along ``axis`` hold the values.

    ``packed``/``scales`` encode the visible slice (``shape`` with ``len(units)``
    along ``axis``); every other unit is zero. ``out`` (flat float32, C order)
    receives the tensor when given: every entry is written, so it needs no zeroing.
    """
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    count = outer * units.size * inner
    out = _output(out, math.prod(shape))
    parallel = count >= PARALLEL_THRESHOLD
    if inner >= 8:
        kernel = _scatter_long if parallel else _scatter_long_serial
    else:
        kernel = _scatter_short if parallel else _scatter_short_serial
    kernel(
        packed,
        scales,
        levels,
        bit_width,
        block_size,
        outer,
        units.astype(np.int64),
        _hidden(shape[axis], units),
        shape[axis],
        inner,
        out,
    )
    return out.reshape(shape)


def _output(out: np.ndarray | None, size: int) -> np.ndarray:
    """``out`` checked as a kernel's flat float32 output of ``size`` values, or a new one."""
    if out is None:
        return np.empty(size, dtype=np.float32)
    if out.dtype != np.float32 or out.ndim != 1 or out.size != size:
        raise ValueError(f"output must be flat float32 of {size} values")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("output must be contiguous and writable")
    return out


def _hidden(num_units: int, units: np.ndarray) -> np.ndarray:
    """The units in ``range(num_units)`` that are not in ``units`` (int64, increasing)."""
    hidden = np.ones(num_units, dtype=bool)
    hidden[units] = False
    return np.flatnonzero(hidden).astype(np.int64, copy=False)


def _rows(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """``(outer, units, inner)``: ``shape`` seen as rows of units along ``axis``.

    An unmasked tensor (``axis`` -1) is one unit per row of its first dimension,
    so that large tensors still split into rows for the threads.
    """
    if axis < 0:
        outer = shape[0] if len(shape) > 1 else 1
        return outer, 1, math.prod(shape) // outer
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def similarity_sums(
    packed: np.ndarray,
    scales: np.ndarray,
    levels: np.ndarray,
    bit_width: int,
    block_size: int,
    shape: tuple[int, ...],
    axis: int,
    units: np.ndarray | None,
    factor: float,
    reference: np.ndarray,
) -> tuple[float, float, float]:
    """``(a.b, a.a, |a-b|^2)`` in float64 without building ``a``, the decoded dense tensor.

    ``a`` is what :func:`dequantize_scatter` returns (``units`` None: every unit,
    as :func:`dequantize_unpack`), times ``factor``; ``reference`` is ``b``, flat
    float32 of ``shape``.
    """
    outer, num_units, inner = _rows(shape, axis)
    if units is None:
        units = np.arange(num_units)
    count = outer * units.size * inner
    out = np.empty((outer, 3), dtype=np.float64)
    parallel = count >= PARALLEL_THRESHOLD and outer > 1
    kernel = _similarity_sums if parallel else _similarity_sums_serial
    kernel(
        packed,
        scales,
        levels,
        bit_width,
        block_size,
        outer,
        units.astype(np.int64),
        _hidden(num_units, units),
        num_units,
        inner,
        float(factor),
        reference,
        out,
    )
    dot, own, gap = out.sum(axis=0)
    return float(dot), float(own), float(gap)
