"""Block-wise NormalFloat quantization and bit packing (pure tensor code).

A k-bit NormalFloat (NF-k) codebook has exactly ``2**k`` levels in [-1, 1] placed
at quantiles of the standard normal distribution, with an exact zero: ``2**(k-1)``
positive levels, ``2**(k-1) - 1`` negative levels and 0, built the way QLoRA
builds NF4 (for k = 4 it reproduces QLoRA's published NF4 table). A tensor is
flattened and cut into blocks of ``block_size`` values (the last block may be
shorter); each block is divided by its absolute maximum (its *scale*) and every
value is replaced by the index (*code*) of the nearest level. Codes travel
bit-packed, ``k`` bits each, in a ``uint8`` tensor.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

MIN_BIT_WIDTH = 2
MAX_BIT_WIDTH = 8


def _check_bit_width(bit_width: int) -> None:
    if not MIN_BIT_WIDTH <= bit_width <= MAX_BIT_WIDTH:
        raise ValueError(f"bit width must be in {MIN_BIT_WIDTH}..{MAX_BIT_WIDTH}, got {bit_width}")


@cache
def _codebook(bit_width: int) -> torch.Tensor:
    _check_bit_width(bit_width)
    levels = 2**bit_width
    # QLoRA's offset for NF4 is 1 - (1/32 + 1/30) / 2: half-way between the
    # quantiles that 16 and 15 equal-mass bins would put at the tail. Generalised
    # to 2**k and 2**k - 1 bins so every k gets the same construction.
    offset = 1.0 - 0.5 * (1.0 / (2 * levels) + 1.0 / (2 * (levels - 1)))
    positive_count = levels // 2
    negative_count = levels // 2 - 1
    ndtri = torch.special.ndtri
    positive = ndtri(torch.linspace(offset, 0.5, positive_count + 1, dtype=torch.float64)[:-1])
    negative = -ndtri(torch.linspace(offset, 0.5, negative_count + 1, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = torch.sort(values / values.abs().max()).values
    return values.to(torch.float32)


def normal_float_codebook(bit_width: int) -> torch.Tensor:
    """Return the sorted NF-k codebook: ``2**bit_width`` float32 levels with exact 0."""
    return _codebook(bit_width).clone()


@cache
def _midpoints(bit_width: int) -> torch.Tensor:
    levels = _codebook(bit_width)
    return (levels[1:] + levels[:-1]) / 2


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks a tensor of ``numel`` values is cut into."""
    return math.ceil(numel / block_size)


def _padded_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def quantize(
    values: torch.Tensor, bit_width: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``values`` block-wise to NF-``bit_width`` codes.

    Parameters
    ----------
    values : torch.Tensor
        Any floating-point tensor; it is flattened in row-major order.
    bit_width : int
        Bits per code, 2..8.
    block_size : int
        Values sharing one absmax scale (>= 1). A trailing partial block is fine.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``codes`` (uint8, one per value, unpacked) and ``scales`` (float32, one per
        block).

    """
    _check_bit_width(bit_width)
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    flat = values.detach().reshape(-1).to(torch.float32)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    blocks = _padded_blocks(flat, block_size)
    scales = blocks.abs().amax(dim=1)
    # An all-zero block keeps scale 0; dividing by 1 instead maps it to code(0).
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    normalized = blocks / safe.unsqueeze(1)
    midpoints = _midpoints(bit_width).to(flat.device)
    codes = torch.bucketize(normalized, midpoints).to(torch.uint8)
    return codes.reshape(-1)[: flat.numel()], scales


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, bit_width: int, block_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize`: a flat float32 tensor of ``codes.numel()`` values."""
    levels = _codebook(bit_width).to(codes.device)
    numel = codes.numel()
    if scales.numel() != num_blocks(numel, block_size):
        raise ValueError(
            f"{scales.numel()} scales do not fit {numel} codes in blocks of {block_size}"
        )
    values = levels[codes.reshape(-1).long()]
    blocks = _padded_blocks(values, block_size) * scales.to(torch.float32).unsqueeze(1)
    return blocks.reshape(-1)[:numel]


def packed_size(count: int, bit_width: int) -> int:
    """Bytes needed to hold ``count`` codes of ``bit_width`` bits."""
    return math.ceil(count * bit_width / 8)


def pack_bits(codes: torch.Tensor, bit_width: int) -> torch.Tensor:
    """Pack uint8 codes (each < 2**bit_width) into a dense uint8 bit stream.

    Bits are written most significant first; the last byte is zero-padded.
    """
    _check_bit_width(bit_width)
    flat = codes.reshape(-1).to(torch.uint8)
    if bit_width == 8:
        return flat.clone()
    shifts = torch.arange(bit_width - 1, -1, -1, dtype=torch.uint8, device=flat.device)
    bits = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = packed_size(flat.numel(), bit_width) * 8 - bits.numel()
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bit_width: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as uint8."""
    _check_bit_width(bit_width)
    flat = packed.reshape(-1).to(torch.uint8)
    if flat.numel() != packed_size(count, bit_width):
        raise ValueError(
            f"{flat.numel()} packed bytes cannot hold exactly {count} codes of {bit_width} bits"
        )
    if bit_width == 8:
        return flat.clone()
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=flat.device)
    bits = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * bit_width]
    weights = 2 ** torch.arange(bit_width - 1, -1, -1, device=flat.device)
    return (bits.view(count, bit_width).long() * weights).sum(dim=1).to(torch.uint8)


def use_kernels(tensor: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` ("auto", "numba" or "torch") runs the compiled kernels on ``tensor``."""
    from fedqsn_flwr.core import kernels

    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    if backend == "numba" and not kernels.AVAILABLE:
        raise RuntimeError("backend 'numba' needs the numba package")
    return backend != "torch" and kernels.AVAILABLE and tensor.device.type == "cpu"


def quantize_packed(
    values: torch.Tensor, bit_width: int, block_size: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and bit-pack in one step: ``(packed codes, scales)``.

    Bit for bit the same as ``pack_bits(quantize(...)[0])`` and ``quantize(...)[1]``.
    ``backend`` ``"auto"`` uses the compiled kernels of :mod:`fedqsn_flwr.core.kernels`
    for CPU tensors when numba is installed and the tensor code otherwise (e.g. on
    CUDA); ``"torch"`` forces the tensor code, ``"numba"`` the kernels.
    """
    _check_bit_width(bit_width)
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    if not use_kernels(values, backend):
        codes, scales = quantize(values, bit_width, block_size)
        return pack_bits(codes, bit_width), scales
    from fedqsn_flwr.core import kernels

    flat = values.detach().reshape(-1).to(torch.float32).contiguous().numpy()
    scales = kernels.block_absmax(flat, block_size)
    if not np.isfinite(scales).all():
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    midpoints = _midpoints(bit_width).numpy()
    packed = kernels.quantize_pack(flat, scales, midpoints, bit_width, block_size)
    return torch.from_numpy(packed), torch.from_numpy(scales)


def _check_sizes(
    packed: torch.Tensor, scales: torch.Tensor, count: int, bit_width: int, block_size: int
) -> None:
    if packed.numel() != packed_size(count, bit_width):
        raise ValueError(
            f"{packed.numel()} packed bytes cannot hold exactly {count} codes of {bit_width} bits"
        )
    if scales.numel() != num_blocks(count, block_size):
        raise ValueError(
            f"{scales.numel()} scales do not fit {count} codes in blocks of {block_size}"
        )


def kernel_inputs(
    packed: torch.Tensor, scales: torch.Tensor, bit_width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed codes, float32 scales and the codebook as the kernels take them."""
    return (
        packed.reshape(-1).to(torch.uint8).contiguous().numpy(),
        scales.reshape(-1).to(torch.float32).contiguous().numpy(),
        _codebook(bit_width).numpy(),
    )


def _kernel_output(out: torch.Tensor | None, size: int) -> np.ndarray | None:
    """``out``'s memory as a flat numpy array the kernels can write, or None if they cannot."""
    if out is None or out.numel() != size:
        return None
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        return None
    return out.detach().view(-1).numpy()


def dequantize_packed(
    packed: torch.Tensor,
    scales: torch.Tensor,
    bit_width: int,
    block_size: int,
    count: int,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_packed`: ``count`` float32 values (flat).

    Bit for bit the same as ``dequantize(unpack_bits(packed, ...), scales, ...)``.
    ``out`` (any tensor of ``count`` entries) receives the values when given and is
    returned; the kernels write straight into a contiguous float32 CPU ``out``.
    """
    _check_bit_width(bit_width)
    _check_sizes(packed, scales, count, bit_width, block_size)
    if out is not None and out.numel() != count:
        raise ValueError(f"out has {out.numel()} entries for {count} values")
    target = _kernel_output(out, count)
    if not use_kernels(packed, backend) or (out is not None and target is None):
        codes = unpack_bits(packed.to(torch.uint8), bit_width, count)
        values = dequantize(codes, scales.to(torch.float32), bit_width, block_size)
        if out is None:
            return values
        return out.copy_(values.view(out.shape))
    from fedqsn_flwr.core import kernels

    values = kernels.dequantize_unpack(
        *kernel_inputs(packed, scales, bit_width), bit_width, block_size, count, target
    )
    return out if out is not None else torch.from_numpy(values)


def dequantize_into_units(
    packed: torch.Tensor,
    scales: torch.Tensor,
    bit_width: int,
    block_size: int,
    shape: tuple[int, ...],
    axis: int,
    units: torch.Tensor,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense tensor of ``shape``: the decoded visible slice at ``units`` along ``axis``, else 0.

    Bit for bit the same as dequantizing the slice and ``index_copy_``-ing it into
    zeros; the kernels write each value straight to its place. ``out`` (a tensor of
    ``shape``) receives the result when given and is returned; every entry is
    overwritten.
    """
    slice_shape = list(shape)
    slice_shape[axis] = units.numel()
    count = math.prod(slice_shape)
    if out is not None and tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    target = _kernel_output(out, math.prod(shape))
    if not use_kernels(packed, backend) or (out is not None and target is None):
        values = dequantize_packed(packed, scales, bit_width, block_size, count, backend="torch")
        dense = torch.zeros(shape, dtype=torch.float32, device=packed.device)
        dense.index_copy_(axis, units.to(packed.device), values.view(slice_shape))
        return dense if out is None else out.copy_(dense)
    from fedqsn_flwr.core import kernels

    _check_bit_width(bit_width)
    _check_sizes(packed, scales, count, bit_width, block_size)
    units_np = units.cpu().numpy()
    if units_np.size and (units_np.min() < 0 or units_np.max() >= shape[axis]):
        raise ValueError(f"unit indices out of range for {shape[axis]} units")
    if units_np.size > 1 and bool((np.diff(units_np) <= 0).any()):
        raise ValueError("unit indices must be strictly increasing")
    dense = kernels.dequantize_scatter(
        *kernel_inputs(packed, scales, bit_width),
        bit_width=bit_width,
        block_size=block_size,
        shape=tuple(shape),
        axis=axis,
        units=units_np,
        out=target,
    )
    return out if out is not None else torch.from_numpy(dense).view(shape)
