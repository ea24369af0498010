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
import types
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

try:
    from numba import njit, prange
    from numba.typed import List

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without numba
    AVAILABLE = False

__all__ = [
    "AVAILABLE",
    "SimilarityItem",
    "aggregate_rows",
    "block_absmax",
    "code_squares",
    "dequantize_scatter",
    "dequantize_unpack",
    "many_scaled_squares",
    "many_similarity_sums",
    "quantize_pack",
    "scaled_squares",
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

    @njit(inline="always", fastmath={"reassoc"}, error_model="numpy")
    def _run_sums(
        packed: np.ndarray,
        scales: np.ndarray,
        levels: np.ndarray,
        bit_width: int,
        block_size: int,
        i: int,
        count: int,
        factor: float,
        reference: np.ndarray,
        base: int,
        units: np.ndarray,
    ) -> tuple[float, float, float]:
        # Sums over codes i .. i+count-1 against reference[base + t] (units empty)
        # or reference[base + units[t]], t = 0 .. count-1, a block's run at a
        # time (its scale fixed, no per-value block bookkeeping). Sums may be
        # reassociated: the compiler splits them into vector lanes.
        dot = 0.0
        own = 0.0
        gap = 0.0
        t = 0
        while t < count:
            block = (i + t) // block_size
            stop = min(count, (block + 1) * block_size - i)
            scale = scales[block]
            for j in range(t, stop):
                if bit_width == 4:
                    code = (np.int64(packed[(i + j) >> 1]) >> ((((i + j) & 1) ^ 1) << 2)) & 15
                else:
                    code = _code(packed, bit_width, i + j)
                a = np.float64(levels[code] * scale) * factor
                if units.size == 0:
                    b = np.float64(reference[base + j])
                else:
                    b = np.float64(reference[base + units[j]])
                dot += a * b
                own += a * a
                gap += (a - b) * (a - b)
            t = stop
        return dot, own, gap

    @njit(parallel=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
    def _similarity_sums(
        packeds: Any,
        scaless: Any,
        levels: np.ndarray,
        bit_width: int,
        block_size: int,
        shapes: np.ndarray,
        unit_lists: Any,
        hiddens: Any,
        factors: np.ndarray,
        references: Any,
        job_tensor: np.ndarray,
        job_row: np.ndarray,
        job_rows: np.ndarray,
        out: np.ndarray,
    ) -> None:
        # Walks the codes as the scatter kernels do, but instead of writing the
        # dense tensor it sums a.b, a.a and (a-b)^2 in float64 against the dense
        # reference b (a = decoded value * factor; a = 0 at hidden units), per
        # job: rows job_row .. job_row + job_rows - 1 of tensor job_tensor. Every
        # tensor of a proxy in one call: the threads start once, not per tensor.
        contiguous = np.zeros(0, dtype=np.int64)
        for job in prange(job_tensor.size):
            t = job_tensor[job]
            packed = packeds[t]
            scales = scaless[t]
            units = unit_lists[t]
            hidden = hiddens[t]
            reference = references[t]
            num_units = shapes[t, 1]
            inner = shapes[t, 2]
            factor = factors[t]
            visible = units.size
            dot = 0.0
            own = 0.0
            gap = 0.0
            for o in range(job_row[job], job_row[job] + job_rows[job]):
                row = o * num_units
                if inner == 1:  # a row's codes in one run, its reference gathered by unit
                    d, w, g = _run_sums(
                        packed,
                        scales,
                        levels,
                        bit_width,
                        block_size,
                        o * visible,
                        visible,
                        factor,
                        reference,
                        row,
                        units,
                    )
                    dot += d
                    own += w
                    gap += g
                else:  # a run per visible unit, its reference contiguous
                    for v in range(visible):
                        d, w, g = _run_sums(
                            packed,
                            scales,
                            levels,
                            bit_width,
                            block_size,
                            (o * visible + v) * inner,
                            inner,
                            factor,
                            reference,
                            (row + units[v]) * inner,
                            contiguous,
                        )
                        dot += d
                        own += w
                        gap += g
                for h in range(hidden.size):
                    base = (row + hidden[h]) * inner
                    for k in range(inner):
                        b = np.float64(reference[base + k])
                        gap += b * b
            out[job, 0] = dot
            out[job, 1] = own
            out[job, 2] = gap

    @njit(parallel=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
    def _scaled_squares(
        datas: Any,
        table: np.ndarray,
        divisors: np.ndarray,
        job_array: np.ndarray,
        job_start: np.ndarray,
        chunk: int,
        out: np.ndarray,
    ) -> None:
        # out[job]: sum of float64(float32(x / divisor))**2 over one chunk of one
        # array; fixed chunks, so the totals do not depend on the number of
        # threads (within a chunk the sum may be split into vector lanes)
        for job in prange(job_array.size):
            data = datas[job_array[job]]
            divisor = divisors[job_array[job]]
            total = 0.0
            if table.size == 0:
                for i in range(job_start[job], min(job_start[job] + chunk, data.size)):
                    value = np.float64(np.float32(data[i]) / divisor)
                    total += value * value
            else:
                for i in range(job_start[job], min(job_start[job] + chunk, data.size)):
                    value = np.float64(table[np.int64(data[i])] / divisor)
                    total += value * value
            out[job] = total

    @njit(parallel=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
    def _code_squares(
        packed: np.ndarray,
        scales: np.ndarray,
        levels: np.ndarray,
        bit_width: int,
        block_size: int,
        count: int,
        out: np.ndarray,
    ) -> None:
        # out[block]: the sum of squares, in float64, of the block's decoded values
        # (float32 level x scale, as the decoder computes them) without storing them
        for block in prange(out.size):
            start = block * block_size
            end = min(start + block_size, count)
            scale = scales[block]
            total = 0.0
            if bit_width == 4 and block_size % 2 == 0:
                for byte in range(start >> 1, end >> 1):
                    high = np.float64(levels[packed[byte] >> 4] * scale)
                    low = np.float64(levels[packed[byte] & 15] * scale)
                    total += high * high + low * low
                if end & 1:
                    last = np.float64(levels[packed[end >> 1] >> 4] * scale)
                    total += last * last
            else:
                for i in range(start, end):
                    value = np.float64(levels[_code(packed, bit_width, i)] * scale)
                    total += value * value
            out[block] = total

    @njit(parallel=True, cache=True, error_model="numpy")
    def _aggregate_rows(
        base: np.ndarray,
        outer: int,
        num_units: int,
        inner: int,
        width: int,
        datas: Any,
        unit_lists: Any,
        table: np.ndarray,
        divisors: np.ndarray,
        weights: np.ndarray,
        unit_weights: np.ndarray,
        out: np.ndarray,
    ) -> None:
        # Job (o, k0): row o, entries k0 .. k0+width-1 of every unit. Its sums over
        # all clients stay in a small float64 buffer (in cache) while every
        # client's slices of that row stream past once; each position sums its
        # clients in order, exactly as apply_updates' reference does. (The
        # numpy error model: no zero check in the divisions, which vectorize.)
        pieces = (inner + width - 1) // width
        for job in prange(outer * pieces):
            o = job // pieces
            k0 = (job - o * pieces) * width
            span = min(width, inner - k0)
            acc = np.zeros(num_units * span)
            for c in range(len(datas)):
                data = datas[c]
                units = unit_lists[c]
                visible = units.size
                divisor = divisors[c]
                weight = weights[c]
                row = o * visible * inner + k0
                if span == 1:
                    if table.size == 0:
                        for v in range(visible):
                            x = np.float32(data[row + v * inner])
                            acc[units[v]] += np.float64(x / divisor) * weight
                    else:
                        for v in range(visible):
                            x = table[np.int64(data[row + v * inner])]
                            acc[units[v]] += np.float64(x / divisor) * weight
                    continue
                for v in range(visible):
                    src = row + v * inner
                    dst = units[v] * span
                    if table.size == 0:
                        for k in range(span):
                            x = np.float32(data[src + k])
                            acc[dst + k] += np.float64(x / divisor) * weight
                    else:
                        for k in range(span):
                            x = table[np.int64(data[src + k])]
                            acc[dst + k] += np.float64(x / divisor) * weight
            # base + weighted mean where any client saw the unit, base + 0.0 elsewhere
            start = o * num_units * inner + k0
            if inner == 1:
                for u in range(num_units):
                    mean = acc[u] / max(unit_weights[u], 1e-300)
                    mean = mean if unit_weights[u] > 0 else 0.0
                    out[start + u] = np.float32(np.float64(base[start + u]) + mean)
                continue
            for u in range(num_units):
                total_weight = unit_weights[u]
                for k in range(span):
                    mean = acc[u * span + k] / max(total_weight, 1e-300)
                    mean = mean if total_weight > 0 else 0.0
                    at = start + u * inner + k
                    out[at] = np.float32(np.float64(base[at]) + mean)

    def _serial(kernel: Any, **options: Any) -> Any:
        """A single-threaded twin of ``kernel``, compiled and cached apart from it.

        numba's cache tells functions apart by qualified name and signature, not
        by flags: ``njit(cache=True)(kernel.py_func)`` shared the parallel
        kernel's cache entry, so whichever variant compiled first served both
        (a "serial" kernel starting threads, or a "parallel" one running on one).
        """
        func = kernel.py_func
        twin = types.FunctionType(
            func.__code__, func.__globals__, f"{func.__name__}_serial", func.__defaults__
        )
        twin.__qualname__ = f"{func.__qualname__}_serial"
        return njit(cache=True, **options)(twin)

    # Starting the thread pool costs ~10 us per call: more than the whole work
    # on the small tensors of small models (biases, first layers).
    _block_absmax_serial = _serial(_block_absmax)
    _quantize_pack_serial = _serial(_quantize_pack)
    _dequantize_unpack_serial = _serial(_dequantize_unpack)
    _scatter_long_serial = _serial(_scatter_long)
    _scatter_short_serial = _serial(_scatter_short)
    _similarity_sums_serial = _serial(_similarity_sums, fastmath={"reassoc"}, error_model="numpy")
    _scaled_squares_serial = _serial(_scaled_squares, fastmath={"reassoc"}, error_model="numpy")
    _aggregate_rows_serial = _serial(_aggregate_rows, error_model="numpy")
    _code_squares_serial = _serial(_code_squares, fastmath={"reassoc"}, error_model="numpy")

#: Below this many values the kernels run on one thread.
PARALLEL_THRESHOLD = 1 << 16
#: Values per job of the similarity kernel (whole rows of one tensor).
_SIMILARITY_JOB = 1 << 14


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
    *,
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
    *,
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
    item = SimilarityItem(packed, scales, shape, axis, units, factor, reference)
    return many_similarity_sums([item], levels, bit_width, block_size)[0]


@dataclass(frozen=True, eq=False)  # holds arrays: identity, not value, equality
class SimilarityItem:
    """One tensor for :func:`many_similarity_sums` (the arguments of :func:`similarity_sums`)."""

    packed: np.ndarray
    scales: np.ndarray
    shape: tuple[int, ...]
    axis: int
    units: np.ndarray | None
    factor: float
    reference: np.ndarray


def many_similarity_sums(
    items: Sequence[SimilarityItem], levels: np.ndarray, bit_width: int, block_size: int
) -> list[tuple[float, float, float]]:
    """:func:`similarity_sums` of every item, in one call of the kernel (codes of one width)."""
    packeds, scaless, unit_lists, hiddens, references = List(), List(), List(), List(), List()
    shapes = np.zeros((len(items), 3), dtype=np.int64)
    factors = np.zeros(len(items), dtype=np.float64)
    for t, item in enumerate(items):
        outer, num_units, inner = _rows(item.shape, item.axis)
        units = np.arange(num_units) if item.units is None else item.units
        shapes[t] = outer, num_units, inner
        factors[t] = item.factor
        packeds.append(_frozen(item.packed))
        scaless.append(_frozen(item.scales))
        unit_lists.append(_frozen(units.astype(np.int64)))
        hiddens.append(_frozen(_hidden(num_units, units)))
        references.append(_frozen(item.reference))
    # jobs of whole rows, about _SIMILARITY_JOB values each
    row_values = np.array([u.size for u in unit_lists], dtype=np.int64) * shapes[:, 2]
    per_job = np.maximum(1, _SIMILARITY_JOB // np.maximum(row_values, 1))
    jobs = -(-shapes[:, 0] // per_job)
    job_tensor = np.repeat(np.arange(len(items), dtype=np.int64), jobs)
    starts = np.concatenate([[0], np.cumsum(jobs)])
    job_row = (np.arange(job_tensor.size, dtype=np.int64) - starts[job_tensor]) * per_job[
        job_tensor
    ]
    job_rows = np.minimum(per_job[job_tensor], shapes[job_tensor, 0] - job_row)
    out = np.zeros((job_tensor.size, 3), dtype=np.float64)
    if job_tensor.size:
        count = int((shapes[:, 0] * row_values).sum())
        parallel = count >= PARALLEL_THRESHOLD and job_tensor.size > 1
        kernel = _similarity_sums if parallel else _similarity_sums_serial
        kernel(
            packeds,
            scaless,
            levels,
            bit_width,
            block_size,
            shapes,
            unit_lists,
            hiddens,
            factors,
            references,
            job_tensor,
            job_row,
            job_rows,
            out,
        )
    sums = []
    for t in range(len(items)):
        dot, own, gap = out[starts[t] : starts[t + 1]].sum(axis=0)
        sums.append((float(dot), float(own), float(gap)))
    return sums


#: Every float16 value as float32, indexed by its bits (the kernels' float16 reads).
_FLOAT16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
_FLOAT16_TABLE = _FLOAT16_TABLE.astype(np.float32)
_NO_TABLE = np.zeros(0, dtype=np.float32)
#: Values per partial sum of :func:`scaled_squares`.
_SQUARES_CHUNK = 1 << 16


def _frozen(values: np.ndarray) -> np.ndarray:
    """A read-only view of ``values``: one array type for the kernels' typed lists.

    numba types read-only and writable arrays apart, and a typed list holds one
    type; the messages' arrays are read-only, the server's own are not.
    """
    view = values.view()
    view.flags.writeable = False
    return view


def _kernel_data(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` flat and read-only as the kernels read them: float32 as is, float16 as bits."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.dtype == np.float16:
        return _frozen(flat.view(np.uint16)), _FLOAT16_TABLE
    if flat.dtype != np.float32:
        raise TypeError(f"the kernels read float32 or float16 values, not {flat.dtype}")
    return _frozen(flat), _NO_TABLE


def code_squares(
    packed: np.ndarray,
    scales: np.ndarray,
    levels: np.ndarray,
    *,
    bit_width: int,
    block_size: int,
    count: int,
) -> float:
    """Sum of squares, in float64, of the ``count`` values that NF-k codes decode to.

    Reads the codes only (no decoded tensor): each value is computed as the
    decoder computes it (float32 level x scale) and squared in float64, so the
    sum equals that over the decoded tensor up to summation order.
    """
    out = np.empty(-(-count // block_size), dtype=np.float64)
    kernel = _code_squares if count >= PARALLEL_THRESHOLD else _code_squares_serial
    kernel(packed, scales, levels, bit_width, block_size, count, out)
    return float(out.sum())


def scaled_squares(values: np.ndarray, divisor: float = 1.0) -> float:
    """Sum of ``float64(float32(x / divisor)) ** 2`` over float32 or float16 ``values``.

    Not finite exactly when a value is not (a finite float32 squared in float64
    cannot overflow). The division is float32's, as ``torch.Tensor / float``.
    """
    return many_scaled_squares([values], [divisor])[0]


def many_scaled_squares(values: Sequence[np.ndarray], divisors: Sequence[float]) -> list[float]:
    """:func:`scaled_squares` of every array, one call of the kernel per dtype."""
    totals = [0.0] * len(values)
    for float16 in (False, True):
        chosen = [i for i, v in enumerate(values) if (v.dtype == np.float16) == float16]
        if not chosen:
            continue
        datas = List()
        table = _NO_TABLE
        for i in chosen:
            data, table = _kernel_data(values[i])
            datas.append(data)
        jobs = np.array([max(1, -(-d.size // _SQUARES_CHUNK)) for d in datas], dtype=np.int64)
        job_array = np.repeat(np.arange(len(chosen), dtype=np.int64), jobs)
        starts = np.concatenate([[0], np.cumsum(jobs)])
        job_start = (np.arange(job_array.size, dtype=np.int64) - starts[job_array]) * _SQUARES_CHUNK
        out = np.empty(job_array.size, dtype=np.float64)
        size = sum(d.size for d in datas)
        kernel = _scaled_squares if size >= PARALLEL_THRESHOLD else _scaled_squares_serial
        divs = np.array([divisors[i] for i in chosen], dtype=np.float32)
        kernel(datas, table, divs, job_array, job_start, _SQUARES_CHUNK, out)
        for j, i in enumerate(chosen):
            totals[i] = float(out[starts[j] : starts[j + 1]].sum())
    return totals


def aggregate_rows(
    base: np.ndarray,
    shape: tuple[int, ...],
    axis: int,
    deltas: Sequence[np.ndarray],
    units: Sequence[np.ndarray | None],
    divisors: Sequence[float],
    weights: Sequence[float],
    out: np.ndarray,
) -> None:
    """``base`` plus the per-position weighted mean of ``deltas``, into ``out``.

    The kernel behind :func:`fedqsn_flwr.core.aggregation.apply_updates`, with the
    same float32 and float64 operations in the same order, so the same result bit
    for bit. ``base`` and ``out`` are flat float32 of ``shape``. Delta ``c`` is
    float32 or float16 of ``shape`` with only ``units[c]`` along ``axis`` (every
    unit when ``axis`` is -1), in global units once divided by ``divisors[c]`` in
    float32; it weighs ``weights[c]``. All deltas have the same dtype.
    """
    outer, num_units, inner = _rows(shape, axis)
    unit_weights = np.zeros(num_units, dtype=np.float64)
    datas, tables, unit_lists = List(), set(), List()
    every = np.arange(num_units, dtype=np.int64)
    for delta, visible, weight in zip(deltas, units, weights, strict=True):
        visible = every if visible is None else visible
        data, table = _kernel_data(delta)
        if data.size != outer * visible.size * inner:
            raise ValueError(f"a delta has {data.size} values for {visible.size} units of {shape}")
        datas.append(data)
        tables.add(id(table))
        unit_lists.append(visible.astype(np.int64))
        unit_weights[visible] += weight
    if len(tables) > 1:
        raise TypeError("the deltas mix float16 and float32")
    table = _FLOAT16_TABLE if id(_FLOAT16_TABLE) in tables else _NO_TABLE
    # a row's sums in a buffer of at most 8 K values (64 KB): in cache, and
    # below the size at which malloc maps fresh pages for every job
    width = max(1, min(inner, (1 << 13) // num_units))
    count = outer * num_units * inner
    kernel = _aggregate_rows if count >= PARALLEL_THRESHOLD else _aggregate_rows_serial
    kernel(
        base,
        outer,
        num_units,
        inner,
        width,
        datas,
        unit_lists,
        table,
        np.asarray(divisors, dtype=np.float32),
        np.asarray(weights, dtype=np.float64),
        unit_weights,
        out,
    )
