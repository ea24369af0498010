import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedqsn_flwr.masking import (
    apply_mask,
    derive_seed,
    draw_client_mask,
    draw_server_mask,
    policy_for_model,
)
from fedqsn_flwr.models import build_model
from fedqsn_flwr.proxy import (
    InvalidUpdate,
    decode_proxy,
    decode_update,
    encode_proxy,
    encode_update,
)
from fedqsn_flwr.quantization import dequantize, quantize


def _setup(p1=0.3, p2=0.2):
    torch.manual_seed(0)
    model = build_model("cnn")
    policy = policy_for_model(model)
    state = model.state_dict()
    server = draw_server_mask(policy, p1, seed=11)
    visible = draw_client_mask(server, p2, derive_seed(11, 1, 1, 0))
    return model, policy, state, visible


@pytest.mark.parametrize("bits", [None, 2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [1, 50, 64])
def test_proxy_round_trip_equals_masked_quantized_model(bits, block_size):
    _, policy, state, visible = _setup()
    arrays, layout, _ = encode_proxy(state, policy, visible, bits, block_size)
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
        expected = dequantize(codes, scales, bits, block_size).view(values.shape)
        got_values = got if axis is None else got.index_select(axis, visible[name])
        assert torch.equal(got_values, expected)
    for name in policy.unit_axes:
        assert torch.equal(proxy.visible[name], visible[name])


def test_update_round_trip_maps_back_to_global_units():
    model, policy, state, visible = _setup()
    arrays, layout, spec = encode_proxy(state, policy, visible, 4, 64)
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
    arrays, layout, spec = encode_proxy(state, policy, visible, 4, 64)
    proxy = decode_proxy(arrays, layout)
    update = encode_update(proxy.state, proxy)
    with pytest.raises(InvalidUpdate, match=reason):
        decode_update(mutate(update), spec, policy)
