import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.core.masking import (
    apply_mask,
    draw_client_mask,
    draw_server_mask,
    policy_for_model,
)
from fedqsn_flwr.core.quantization import dequantize, normal_float_codebook, quantize
from fedqsn_flwr.core.secret import derive_seed
from fedqsn_flwr.flower.proxy import (
    InvalidUpdate,
    array_values,
    compact_scales,
    decode_proxy,
    decode_update,
    encode_proxy,
    encode_update,
)


def _setup(p1=0.3, p2=0.2):
    torch.manual_seed(0)
    model = build_model("cnn")
    policy = policy_for_model(model)
    state = model.state_dict()
    server = draw_server_mask(policy, p1, 11)
    visible = draw_client_mask(server, p2, derive_seed("test", 11, 1, 1, 0))
    return model, policy, state, visible


@pytest.mark.parametrize("bits", [None, 2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [1, 50, 64])
def test_proxy_round_trip_equals_masked_quantized_model(bits, block_size):
    _, policy, state, visible = _setup()
    arrays, layout, _ = encode_proxy(state, policy, visible, bit_width=bits, block_size=block_size)
    proxy = decode_proxy(arrays, layout)
    masked = apply_mask(state, policy, visible)
    for name, tensor in masked.items():
        got = proxy.state[name]
        assert got.shape == tensor.shape
        if bits is None:
            assert torch.allclose(got, tensor)
            continue
        axis = policy.unit_axes.get(name)
        values = tensor if axis is None else tensor.index_select(axis, visible[name])
        codes, scales = quantize(values, bits, block_size)
        # all scales travel in one array: float16 if every one fits, else float32
        scale_dtype = getattr(torch, arrays["proxy/scales"].dtype)
        sent_scales = scales.to(scale_dtype).to(torch.float32)
        expected = dequantize(codes, sent_scales, bits, block_size).view(values.shape)
        got_values = got if axis is None else got.index_select(axis, visible[name])
        assert torch.equal(got_values, expected)
    for name in policy.unit_axes:
        assert torch.equal(proxy.visible[name], visible[name])


def test_update_round_trip_maps_back_to_global_units():
    model, policy, state, visible = _setup()
    arrays, layout, spec = encode_proxy(state, policy, visible, bit_width=4, block_size=64)
    proxy = decode_proxy(arrays, layout)
    trained = {k: v + 0.5 for k, v in proxy.state.items()}
    update = encode_update(trained, proxy)
    assert update["fc1.weight"].shape[1] == visible["fc1.weight"].numel()
    deltas = decode_update(update, spec, policy)
    scale = policy.unit_counts["fc1.weight"] / visible["fc1.weight"].numel()
    assert torch.allclose(deltas["fc1.weight"], torch.full_like(deltas["fc1.weight"], 0.5 / scale))
    assert torch.allclose(deltas["fc1.bias"], torch.full((128,), 0.5))


def _bad(update, name, array):
    arrays = {k: update[k] for k in update.keys()}
    if array is None:
        del arrays[name]
    else:
        arrays[name] = Array(array)
    return ArrayRecord(arrays)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda u: _bad(u, "fc1.bias", None), "missing"),
        (lambda u: _bad(u, "fc1.bias", np.zeros(3, np.float32)), "shape"),
        (lambda u: _bad(u, "fc1.bias", np.zeros(128, np.float64)), "dtype"),
        (lambda u: _bad(u, "fc1.bias", np.full(128, np.nan, np.float32)), "NaN"),
        (lambda u: _bad(u, "fc1.bias", np.full(128, np.inf, np.float32)), "Inf"),
        (lambda u: _bad(u, "extra", np.zeros(1, np.float32)), "unexpected"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(mutate, reason):
    _, policy, state, visible = _setup()
    arrays, layout, spec = encode_proxy(state, policy, visible, bit_width=4, block_size=64)
    proxy = decode_proxy(arrays, layout)
    update = encode_update(proxy.state, proxy)
    with pytest.raises(InvalidUpdate, match=reason):
        decode_update(mutate(update), spec, policy)


def _half_max_gap(bits):
    levels = normal_float_codebook(bits)
    return float((levels[1:] - levels[:-1]).max()) / 2 * (1 + 2**-10)


@pytest.mark.parametrize("update_bits", [32, 16, 8, 4])
def test_compact_updates_decode_close_to_the_float32_update(update_bits):
    # NF-k error is at most half the widest gap between levels, times the block's
    # absmax (<= the tensor's); float16 rounds to 11 significant bits.
    tolerance = {32: 0.0, 16: 2**-11}.get(update_bits)
    if tolerance is None:
        tolerance = _half_max_gap(update_bits)
    _, policy, state, visible = _setup()
    arrays, layout, spec = encode_proxy(
        state, policy, visible, bit_width=4, block_size=64, update_bit_width=update_bits
    )
    proxy = decode_proxy(arrays, layout)
    assert proxy.update_bit_width == update_bits
    generator = torch.Generator().manual_seed(1)
    trained = {
        k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in proxy.state.items()
    }
    exact = decode_update(
        encode_update(trained, _with_bits(proxy, 32)), _spec_bits(spec, 32), policy
    )
    update = encode_update(trained, proxy)
    got = decode_update(update, spec, policy)
    for name, delta in exact.items():
        error = (got[name] - delta).abs().max() / delta.abs().max()
        assert error <= tolerance, (name, float(error))
    size = sum(update[k].numpy().nbytes for k in update.keys())
    size32 = sum(d.numel() * 4 for d in exact.values())
    assert size <= size32 * (update_bits / 32 + 0.07)


def _with_bits(proxy, bits):
    from dataclasses import replace

    return replace(proxy, update_bit_width=bits)


def _spec_bits(spec, bits):
    from dataclasses import replace

    return replace(spec, update_bit_width=bits)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda u: _bad(u, "fc1.bias/scales", np.full(2, np.nan, np.float16)), "NaN"),
        (lambda u: _bad(u, "fc1.bias/scales", np.ones(5, np.float16)), "scales"),
        (lambda u: _bad(u, "fc1.bias/codes", np.zeros(3, np.uint8)), "codes"),
        (lambda u: _bad(u, "fc1.bias/codes", np.zeros(64, np.float32)), "codes"),
        (lambda u: _bad(u, "fc1.bias/scales", None), "missing"),
        (lambda u: _bad(u, "fc1.bias", np.zeros(128, np.float32)), "unexpected"),
    ],
)
def test_bad_quantized_updates_are_rejected_with_a_reason(mutate, reason):
    _, policy, state, visible = _setup()
    arrays, layout, spec = encode_proxy(
        state, policy, visible, bit_width=4, block_size=64, update_bit_width=4
    )
    proxy = decode_proxy(arrays, layout)
    update = encode_update(proxy.state, proxy)
    with pytest.raises(InvalidUpdate, match=reason):
        decode_update(mutate(update), spec, policy)


def test_float16_update_with_float32_array_is_rejected():
    _, policy, state, visible = _setup()
    arrays, layout, spec = encode_proxy(
        state, policy, visible, bit_width=4, block_size=64, update_bit_width=16
    )
    update = encode_update(decode_proxy(arrays, layout).state, decode_proxy(arrays, layout))
    with pytest.raises(InvalidUpdate, match="float16"):
        decode_update(_bad(update, "fc1.bias", np.zeros(128, np.float32)), spec, policy)


def test_scales_fall_back_to_float32_when_float16_would_lose_them():
    normal = torch.tensor([0.0, 1e-3, 2.0, 60000.0])
    assert compact_scales(normal).dtype == torch.float16
    for extreme in (1e-6, 1e5):
        assert compact_scales(torch.tensor([0.5, extreme])).dtype == torch.float32


def test_unknown_update_bit_width_is_refused():
    _, policy, state, visible = _setup()
    with pytest.raises(ValueError, match="update bit width"):
        encode_proxy(state, policy, visible, bit_width=4, block_size=64, update_bit_width=12)


def _proxy_with(arrays, key, array):
    out = {k: arrays[k] for k in arrays.keys()}
    out[key] = Array(array)
    return ArrayRecord(out)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda a: _proxy_with(a, "proxy/codes", a["proxy/codes"].numpy()[:-1]), "too short"),
        (
            lambda a: _proxy_with(
                a, "proxy/codes", np.concatenate([a["proxy/codes"].numpy(), np.zeros(1, np.uint8)])
            ),
            "too many",
        ),
        (
            lambda a: _proxy_with(
                a, "proxy/scales", np.full_like(a["proxy/scales"].numpy(), np.nan)
            ),
            "NaN",
        ),
        (
            lambda a: _proxy_with(a, "proxy/units", np.zeros_like(a["proxy/units"].numpy())),
            "no unit",
        ),
        (lambda a: _proxy_with(a, "proxy/units", a["proxy/units"].numpy()[:-2]), "units"),
        (
            lambda a: _proxy_with(a, "proxy/codes", a["proxy/codes"].numpy().astype(np.int16)),
            "dtype",
        ),
    ],
)
def test_malformed_proxies_are_refused_with_a_reason(mutate, reason):
    _, policy, state, visible = _setup()
    arrays, layout, _ = encode_proxy(state, policy, visible, bit_width=4, block_size=64)
    with pytest.raises(ValueError, match=reason):
        decode_proxy(mutate(arrays), layout)


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(7, dtype=np.uint8),
        np.ones((2, 0, 3), dtype=np.float16),
        np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        np.arange(5, dtype=">i4"),
        np.array(3.5, dtype=np.float32),
    ],
)
def test_array_values_equal_flowers_own_parser(values):
    array = Array(values)
    got = array_values(array)
    assert got.dtype == array.numpy().dtype and got.shape == array.numpy().shape
    assert np.array_equal(got, array.numpy())


@pytest.mark.parametrize("bits", [None, 3, 4])
def test_proxies_sharing_the_unmasked_codes_are_byte_for_byte_the_same(bits):
    _, policy, state, visible = _setup()
    other = draw_client_mask(draw_server_mask(policy, 0.3, 11), 0.2, 5)
    shared = {}
    for mask in (visible, other, visible):
        arrays, layout, spec = encode_proxy(
            state, policy, mask, bit_width=bits, block_size=50, shared=shared
        )
        alone, alone_layout, alone_spec = encode_proxy(
            state, policy, mask, bit_width=bits, block_size=50
        )
        assert sorted(arrays.keys()) == sorted(alone.keys())
        assert all(arrays[k].data == alone[k].data for k in alone.keys())
        assert dict(layout) == dict(alone_layout) and spec.update_shapes == alone_spec.update_shapes
    # quantized once: the unmasked quantized tensors, nothing else
    unmasked = {n for n in policy.quantized if n not in policy.unit_axes}
    assert set(shared) == (unmasked if bits is not None else set())


@pytest.mark.parametrize("update_bits", [32, 16, 4])
def test_checked_update_keeps_the_reply_and_finds_its_norm(update_bits):
    """No copy of the reply's values; decode_update's deltas and norm, and its first error."""
    from fedqsn_flwr.flower.proxy import checked_update

    _, policy, state, visible = _setup()
    arrays, layout, spec = encode_proxy(
        state, policy, visible, bit_width=4, block_size=64, update_bit_width=update_bits
    )
    proxy = decode_proxy(arrays, layout)
    generator = torch.Generator().manual_seed(4)
    trained = {k: v + torch.randn(v.shape, generator=generator) for k, v in proxy.state.items()}
    update = encode_update(trained, proxy)
    checked, norm = checked_update(update, spec, policy)
    deltas = decode_update(update, spec, policy)
    expected = sum(float(d.double().pow(2).sum()) for d in deltas.values()) ** 0.5
    assert norm == pytest.approx(expected, rel=1e-12)
    for name, delta in deltas.items():
        assert torch.equal(checked.in_global_units(name), delta)
    if update_bits == 16:
        assert checked.deltas["fc1.bias"].dtype == torch.float16
    # a NaN in an earlier tensor is named before a wrong dtype in a later one
    if update_bits == 32:
        names = list(spec.update_shapes)
        first, last = names[0], names[-1]
        spoiled = _bad(update, first, np.full(spec.update_shapes[first], np.nan, np.float32))
        spoiled = _bad(spoiled, last, np.zeros(spec.update_shapes[last], np.float64))
        with pytest.raises(InvalidUpdate, match=f"'{first}' holds NaN"):
            checked_update(spoiled, spec, policy)
