"""How close NF-k codes are to a reference tensor, measured without decoding them.

The server's privacy metrics compare every proxy it sends with the global
model. For a quantized tensor the compiled kernel
(:func:`fedqsn_flwr.core.kernels.many_similarity_sums`) reads the codes and
sums ``(a.b, a.a, |a-b|^2)`` in float64 on the way, never building ``a``, the
decoded dense tensor; without numba (or off the CPU) the tensor code decodes one
tensor at a time and sums the same. Both give the same figures up to float64
summation order. The backend is chosen here, as for quantizing and decoding
(:mod:`fedqsn_flwr.core.quantization`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedqsn_flwr.core.quantization import (
    dequantize_into_units,
    dequantize_packed,
    kernel_inputs,
    use_kernels,
)

#: ``(a.b, a.a, |a-b|^2)`` of a decoded tensor ``a`` and a reference ``b``.
Sums = tuple[float, float, float]


@dataclass(frozen=True, eq=False)  # holds tensors: identity, not value, equality
class CodedTensor:
    """One quantized tensor to compare, as it travels.

    Parameters
    ----------
    packed : torch.Tensor
        Bit-packed NF-k codes of the visible slice (all of the tensor when
        ``units`` is None).
    scales : torch.Tensor
        Their float32 block scales.
    shape : tuple[int, ...]
        The dense tensor's full shape.
    axis : int
        Unit axis of ``units`` (-1 when unmasked).
    units : torch.Tensor | None
        Visible units along ``axis``, strictly increasing; hidden units decode to 0.
    factor : float
        Multiplies the decoded tensor first (e.g. undoing a proxy's unit scaling).
    reference : np.ndarray
        ``b``: flat float32 values of ``shape``.

    """

    packed: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    axis: int
    units: torch.Tensor | None
    factor: float
    reference: np.ndarray


def similarity_sums(
    items: Sequence[CodedTensor],
    *,
    bit_width: int,
    block_size: int,
    backend: str = "auto",
) -> list[Sums]:
    """``(a.b, a.a, |a-b|^2)`` of every item, ``a`` its decoded tensor times its factor.

    ``backend``: ``"auto"`` (the kernel, in one call for all items, when numba is
    installed and the codes are on the CPU), ``"numba"`` or ``"torch"``.
    """
    if not items:
        return []
    if use_kernels(items[0].packed, backend):
        return _kernel_sums(items, bit_width, block_size)
    return [_decoded_sums(item, bit_width, block_size) for item in items]


def _kernel_sums(items: Sequence[CodedTensor], bit_width: int, block_size: int) -> list[Sums]:
    from fedqsn_flwr.core import kernels

    batch, levels = [], None
    for item in items:
        packed, scales, levels = kernel_inputs(item.packed, item.scales, bit_width)
        units = None if item.units is None else item.units.cpu().numpy()
        batch.append(
            kernels.SimilarityItem(
                packed, scales, item.shape, item.axis, units, item.factor, item.reference
            )
        )
    assert levels is not None
    return kernels.many_similarity_sums(batch, levels, bit_width, block_size)


def _decoded_sums(item: CodedTensor, bit_width: int, block_size: int) -> Sums:
    if item.units is None:
        count = int(np.prod(item.shape))
        dense = dequantize_packed(
            item.packed, item.scales, bit_width, block_size, count, backend="torch"
        )
    else:
        dense = dequantize_into_units(
            item.packed,
            item.scales,
            bit_width,
            block_size,
            item.shape,
            item.axis,
            item.units,
            backend="torch",
        )
    a = dense.detach().cpu().reshape(-1).numpy().astype(np.float64) * item.factor
    b = item.reference.astype(np.float64)
    diff = a - b
    # elementwise products, not `@`: a BLAS call would start OpenBLAS's spinning
    # threads, which starve the numba and torch thread pools
    return float((a * b).sum()), float((a * a).sum()), float((diff * diff).sum())


def code_squares(
    packed: torch.Tensor,
    scales: torch.Tensor,
    *,
    bit_width: int,
    block_size: int,
    count: int,
    backend: str = "auto",
) -> float:
    """Sum of squares, in float64, of the ``count`` values the codes decode to.

    The kernel reads the codes only; the tensor code decodes them first. Equal
    up to float64 summation order.
    """
    if use_kernels(packed, backend):
        from fedqsn_flwr.core import kernels

        packed_np, scales_np, levels = kernel_inputs(packed, scales, bit_width)
        return kernels.code_squares(
            packed_np,
            scales_np,
            levels,
            bit_width=bit_width,
            block_size=block_size,
            count=count,
        )
    values = dequantize_packed(packed, scales, bit_width, block_size, count, backend="torch")
    return float(values.double().pow(2).sum())
