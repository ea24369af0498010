import math

import pytest
import torch

from fedqsn_flwr.core.quantization import (
    dequantize,
    normal_float_codebook,
    num_blocks,
    pack_bits,
    packed_size,
    quantize,
    unpack_bits,
)

# QLoRA's NF4 table as published (bitsandbytes, functional.py / QLoRA appendix E).
QLORA_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_codebook_matches_qlora():
    codebook = normal_float_codebook(4)
    assert codebook.tolist() == pytest.approx(QLORA_NF4, abs=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
def test_codebook_has_exactly_2_pow_k_levels_with_exact_zero(bits):
    codebook = normal_float_codebook(bits)
    assert codebook.numel() == 2**bits
    assert (codebook == 0).sum() == 1
    assert codebook.min() == -1.0 and codebook.max() == 1.0
    assert torch.all(codebook[1:] > codebook[:-1])


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bit_width_outside_range_is_rejected(bits):
    with pytest.raises(ValueError, match="bit width"):
        quantize(torch.ones(4), bits, 2)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
def test_quantization_error_is_bounded_per_block(bits, block_size):
    gen = torch.Generator().manual_seed(bits * 100 + block_size)
    values = torch.randn(1001, generator=gen) * 3  # 1001: not a multiple of any block
    codes, scales = quantize(values, bits, block_size)
    assert codes.dtype == torch.uint8 and codes.numel() == 1001
    assert scales.numel() == num_blocks(1001, block_size)
    restored = dequantize(codes, scales, bits, block_size)
    codebook = normal_float_codebook(bits)
    half_gap = float((codebook[1:] - codebook[:-1]).max()) / 2
    bound = scales.repeat_interleave(block_size)[:1001] * half_gap
    assert torch.all((values - restored).abs() <= bound + 1e-6)
    # the block maximum is represented exactly (level +-1)
    blocks = [values[i : i + block_size] for i in range(0, 1001, block_size)]
    for block, scale in zip(blocks, scales, strict=True):
        assert float(block.abs().max()) == pytest.approx(float(scale))


def test_error_shrinks_with_more_bits():
    values = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in range(2, 9):
        codes, scales = quantize(values, bits, 64)
        errors.append(float((dequantize(codes, scales, bits, 64) - values).pow(2).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[2] < 0.02  # 4-bit NF on Gaussian data: relative MSE around 1%


def test_zeros_and_all_zero_blocks_stay_exact():
    values = torch.zeros(130)
    values[70] = 2.5
    codes, scales = quantize(values, 3, 64)
    restored = dequantize(codes, scales, 3, 64)
    assert torch.equal(restored, values)


def test_nan_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([1.0, math.nan]), 4, 64)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [1, 3, 8, 13, 1000, 1003])
def test_pack_unpack_is_lossless(bits, count):
    gen = torch.Generator().manual_seed(count)
    codes = torch.randint(0, 2**bits, (count,), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(count, bits) == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 10)
