"""The compiled quantizer equals the reference tensor code bit for bit."""

import numpy as np
import pytest
import torch

from fedqsn_flwr.core import kernels
from fedqsn_flwr.core.quantization import (
    _midpoints,
    dequantize,
    dequantize_into_units,
    dequantize_packed,
    normal_float_codebook,
    pack_bits,
    quantize,
    quantize_packed,
    unpack_bits,
)

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")


def _hard_values(bit_width: int, block_size: int, seed: int = 0) -> torch.Tensor:
    """Random values plus, in every block, values exactly at and next to the midpoints."""
    generator = torch.Generator().manual_seed(seed)
    mids = _midpoints(bit_width)
    edges = torch.cat(
        [
            mids,
            torch.nextafter(mids, torch.full_like(mids, 2.0)),
            torch.nextafter(mids, torch.full_like(mids, -2.0)),
            torch.tensor([-1.0, 0.0, 1.0]),
        ]
    )
    parts = [torch.randn(3001, generator=generator) * 3]
    # Whole blocks whose absmax is 1, so the normalized values hit the midpoints exactly.
    for start in range(0, edges.numel(), max(block_size - 1, 1)):
        chunk = edges[start : start + max(block_size - 1, 1)]
        block = torch.cat([torch.ones(1), chunk])[:block_size]
        parts.append(torch.cat([block, torch.zeros(block_size - block.numel())]))
    parts.append(torch.zeros(block_size))  # an all-zero block
    parts.append(torch.randn(block_size, generator=generator) * 1e-30)  # tiny scales
    return torch.cat(parts)


@pytest.mark.parametrize("bit_width", range(2, 9))
@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
def test_kernels_equal_the_reference_bit_for_bit(bit_width, block_size):
    values = _hard_values(bit_width, block_size)
    codes, scales = quantize(values, bit_width, block_size)
    reference_packed = pack_bits(codes, bit_width)
    packed, fast_scales = quantize_packed(values, bit_width, block_size, backend="numba")
    assert torch.equal(fast_scales, scales)
    assert torch.equal(packed, reference_packed)
    reference_values = dequantize(
        unpack_bits(packed, bit_width, values.numel()), scales, bit_width, block_size
    )
    fast_values = dequantize_packed(
        packed, scales, bit_width, block_size, values.numel(), backend="numba"
    )
    assert torch.equal(fast_values, reference_values)


def test_torch_backend_is_the_reference():
    values = torch.randn(999)
    packed, scales = quantize_packed(values, 3, 64, backend="torch")
    codes, ref_scales = quantize(values, 3, 64)
    assert torch.equal(packed, pack_bits(codes, 3)) and torch.equal(scales, ref_scales)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_kernels_refuse_nan_and_inf(bad):
    values = torch.randn(200)
    values[130] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_packed(values, 4, 64, backend="numba")


def test_kernels_check_sizes():
    packed, scales = quantize_packed(torch.randn(100), 4, 64)
    with pytest.raises(ValueError, match="packed bytes"):
        dequantize_packed(packed[:-1], scales, 4, 64, 100)
    with pytest.raises(ValueError, match="scales"):
        dequantize_packed(packed, scales[:1], 4, 64, 100)


def test_search_grid_is_finer_than_half_the_smallest_gap():
    for bit_width in range(2, 9):
        mids = _midpoints(bit_width).double().numpy()
        cell_counts, _ = kernels._search_tables(tuple(float(m) for m in mids))
        assert 2.0 / cell_counts.size <= np.diff(mids).min() / 2


@pytest.mark.parametrize("bit_width", [2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [64, 7])
def test_parallel_kernels_equal_the_reference_on_large_tensors(bit_width, block_size):
    values = torch.cat(
        [_hard_values(bit_width, block_size), torch.randn(kernels.PARALLEL_THRESHOLD)]
    )
    codes, scales = quantize(values, bit_width, block_size)
    packed, fast_scales = quantize_packed(values, bit_width, block_size, backend="numba")
    assert torch.equal(fast_scales, scales)
    assert torch.equal(packed, pack_bits(codes, bit_width))
    reference = dequantize(codes, scales, bit_width, block_size)
    fast = dequantize_packed(packed, scales, bit_width, block_size, values.numel(), backend="numba")
    assert torch.equal(fast, reference)


@pytest.mark.parametrize("bit_width, block_size", [(3, 50), (4, 64), (4, 7), (5, 64)])
@pytest.mark.parametrize(
    "shape, axis",
    [((6, 40), 1), ((5, 9, 3, 3), 1), ((7, 11), 0), ((4, 300, 60), 1), ((300, 400), 0)],
)
def test_scatter_kernel_equals_dequantize_then_index_copy(shape, axis, bit_width, block_size):
    # short and long unit segments, odd segment lengths and block sizes (4-bit codes
    # then start mid-byte), and a tensor large enough for the parallel kernel
    generator = torch.Generator().manual_seed(5)
    units = torch.sort(
        torch.randperm(shape[axis], generator=generator)[: shape[axis] * 2 // 3]
    ).values
    slice_shape = list(shape)
    slice_shape[axis] = units.numel()
    values = torch.randn(slice_shape, generator=generator)
    packed, scales = quantize_packed(values, bit_width, block_size)
    args = (packed, scales, bit_width, block_size, shape, axis, units)
    fast = dequantize_into_units(*args, backend="numba")
    slow = dequantize_into_units(*args, backend="torch")
    assert torch.equal(fast, slow)
    reference = torch.zeros(shape).index_copy_(
        axis,
        units,
        dequantize(
            unpack_bits(packed, bit_width, values.numel()), scales, bit_width, block_size
        ).view(slice_shape),
    )
    assert torch.equal(fast, reference)


def _dense_sums(dense: torch.Tensor, factor: float, reference: torch.Tensor) -> np.ndarray:
    a, b = dense.double().reshape(-1) * factor, reference.double().reshape(-1)
    return np.array([float(a @ b), float(a @ a), float((a - b).pow(2).sum())])


@pytest.mark.parametrize("bit_width", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "shape, axis",
    [((6, 40), 1), ((5, 9, 3, 3), 1), ((7, 11), 0), ((300, 400), 1), ((9, 13), -1), ((37,), -1)],
)
def test_similarity_sums_equal_sums_over_the_decoded_tensor(bit_width, shape, axis):
    generator = torch.Generator().manual_seed(11)
    reference = torch.randn(shape, generator=generator)
    units = None
    slice_shape = list(shape)
    if axis >= 0:
        units = torch.sort(
            torch.randperm(shape[axis], generator=generator)[: shape[axis] * 2 // 3]
        ).values
        slice_shape[axis] = units.numel()
    values = torch.randn(slice_shape, generator=generator)
    packed, scales = quantize_packed(values, bit_width, 50)
    if units is None:
        dense = dequantize_packed(packed, scales, bit_width, 50, values.numel()).view(shape)
    else:
        dense = dequantize_into_units(packed, scales, bit_width, 50, shape, axis, units)
    factor = 1.25
    expected = _dense_sums(dense, factor, reference)
    found = kernels.similarity_sums(
        packed.numpy(),
        scales.numpy(),
        normal_float_codebook(bit_width).numpy(),
        bit_width=bit_width,
        block_size=50,
        shape=shape,
        axis=axis,
        units=None if units is None else units.numpy(),
        factor=factor,
        reference=reference.reshape(-1).numpy(),
    )
    # the hidden units' share of the gap is counted: it is most of it here
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=0)


def test_single_threaded_kernels_are_cached_apart_from_the_parallel_ones():
    """numba names cache entries by function: twins under one name served each other's code."""
    pairs = [
        (kernels._block_absmax, kernels._block_absmax_serial),
        (kernels._quantize_pack, kernels._quantize_pack_serial),
        (kernels._similarity_sums, kernels._similarity_sums_serial),
        (kernels._aggregate_rows, kernels._aggregate_rows_serial),
        (kernels._code_squares, kernels._code_squares_serial),
    ]
    for parallel, serial in pairs:
        assert parallel.py_func.__qualname__ != serial.py_func.__qualname__
        assert not serial.targetoptions.get("parallel")


@pytest.mark.parametrize("bit_width", [2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [64, 7, 1])
@pytest.mark.parametrize("count", [1, 129, 70_001])  # odd counts; the last one parallel
def test_code_squares_equal_the_squares_of_the_decoded_values(bit_width, block_size, count):
    from fedqsn_flwr.core.similarity import code_squares

    values = torch.randn(count, generator=torch.Generator().manual_seed(count)) * 3
    packed, scales = quantize_packed(values, bit_width, block_size)
    decoded = dequantize_packed(packed, scales, bit_width, block_size, count)
    expected = float(decoded.double().pow(2).sum())
    for backend in ("numba", "torch"):
        found = code_squares(
            packed,
            scales,
            bit_width=bit_width,
            block_size=block_size,
            count=count,
            backend=backend,
        )
        assert found == pytest.approx(expected, rel=1e-12), backend
