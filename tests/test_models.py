"""Every model through the proxy round trip: mask, quantize, pack, rebuild, forward, update back."""

import pytest
import torch

from fedqsn_flwr.app.base import InputSpec
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.core.aggregation import ClientUpdate, apply_updates
from fedqsn_flwr.core.masking import (
    draw_client_mask,
    draw_server_mask,
    policy_for_model,
)
from fedqsn_flwr.core.secret import derive_seed
from fedqsn_flwr.flower.proxy import decode_proxy, decode_update, encode_proxy, encode_update

MNIST = InputSpec("image", (1, 28, 28), 10)
CIFAR = InputSpec("image", (3, 32, 32), 10)
TEXT = InputSpec("text", (16,), 4, vocab_size=500)

# model, data, expected masked tensors (a subset), tensors that must not be masked
CASES = {
    "cnn": (MNIST, {"conv2.weight", "fc1.weight", "fc2.weight"}, {"conv1.weight"}),
    "mlp": (MNIST, {"fc2.weight", "fc3.weight"}, {"fc1.weight"}),
    "resnet18": (
        CIFAR,
        {"layer1.0.conv1.weight", "layer4.1.conv2.weight", "fc.weight"},
        {"conv1.weight"},
    ),
    "transformer": (
        TEXT,
        {"tokens.weight", "blocks.0.query.weight", "blocks.1.down.weight", "head.weight"},
        {"blocks.0.norm1.weight"},
    ),
}


def _batch(spec, n=3):
    generator = torch.Generator().manual_seed(0)
    if spec.kind == "text":
        return torch.randint(0, spec.vocab_size, (n, *spec.shape), generator=generator)
    return torch.randn((n, *spec.shape), generator=generator)


@pytest.mark.parametrize("name", sorted(CASES))
def test_proxy_round_trip_of_every_model(name):
    spec, masked, unmasked = CASES[name]
    model = build_model(name, 0.1, seed=0, spec=spec)
    policy = policy_for_model(model)
    assert masked <= set(policy.unit_axes) and not unmasked & set(policy.unit_axes)
    state = model.state_dict()
    server = draw_server_mask(policy, 0.1, 1)
    visible = draw_client_mask(server, 0.1, derive_seed("test", 1, 1, 1, 0))
    arrays, layout, spec_sent = encode_proxy(state, policy, visible, bit_width=4, block_size=64)
    proxy = decode_proxy(arrays, layout)

    # the rebuilt proxy loads into the model and runs
    model.load_state_dict(proxy.state)
    model.eval()
    logits = model(_batch(spec))
    assert logits.shape == (3, spec.num_classes) and torch.isfinite(logits).all()
    for tensor_name, hidden in proxy.hidden_masks().items():
        assert proxy.state[tensor_name][hidden].eq(0).all(), tensor_name
    # integer buffers (BatchNorm's counter) travel unchanged, float buffers in float32
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            assert torch.equal(proxy.state[key], tensor), key
        elif key not in policy.quantized and key not in policy.unit_axes:
            assert torch.equal(proxy.state[key], tensor), key

    # one step of training, mapped back: only visible positions of the global model move
    trained = {k: v + 0.01 if v.is_floating_point() else v for k, v in proxy.state.items()}
    deltas = decode_update(encode_update(trained, proxy), spec_sent, policy)
    new = apply_updates(state, [ClientUpdate(deltas, spec_sent.visible, 1.0)], policy)
    for tensor_name in policy.unit_axes:
        axis = policy.unit_axes[tensor_name]
        moved = (new[tensor_name] != state[tensor_name]).movedim(axis, 0).flatten(1).any(dim=1)
        expected = torch.zeros_like(moved)
        expected[visible[tensor_name]] = True
        assert torch.equal(moved, expected), tensor_name


@pytest.mark.parametrize("bits", [4, 3, None])
@pytest.mark.parametrize("name", sorted(CASES))
def test_decoding_into_the_model_is_the_classic_decode_bit_for_bit(name, bits):
    """The client's path (decode into its model, train in place) sends the same update."""
    spec, _, _ = CASES[name]
    policy = policy_for_model(build_model(name, 0.1, seed=0, spec=spec))
    state = build_model(name, 0.1, seed=0, spec=spec).state_dict()
    server = draw_server_mask(policy, 0.3, 1)
    visible = draw_client_mask(server, 0.2, derive_seed("test", 1, 1, 1, 0))
    arrays, layout, _ = encode_proxy(
        state, policy, visible, bit_width=bits, block_size=64, update_bit_width=32
    )
    classic = decode_proxy(arrays, layout)

    model = build_model(name, 0.1, seed=5, spec=spec)  # other weights: all must be overwritten
    into = decode_proxy(arrays, layout, into=model.state_dict())
    loaded = model.state_dict()
    assert set(loaded) == set(classic.state)
    for key, tensor in classic.state.items():
        assert torch.equal(loaded[key], tensor), key
        assert loaded[key].data_ptr() == into.state[key].data_ptr()  # no second copy

    # "training" in place; the classic client trains a separate copy the same way
    trained = {k: v.clone() for k, v in classic.state.items()}
    generator = torch.Generator().manual_seed(2)
    for key, tensor in loaded.items():
        if tensor.is_floating_point():
            step = torch.randn(tensor.shape, generator=generator)
            tensor.add_(step)
            trained[key].add_(step)
    expected = encode_update(trained, classic)
    found = encode_update(model.state_dict(), into)
    assert set(found.keys()) == set(expected.keys())
    for key in expected.keys():
        assert found[key].data == expected[key].data, key


def test_decoding_into_a_model_of_another_shape_is_refused():
    spec = CASES["cnn"][0]
    model = build_model("cnn", 0.1, seed=0, spec=spec)
    policy = policy_for_model(model)
    visible = draw_client_mask(draw_server_mask(policy, 0.1, 1), 0.1, 3)
    arrays, layout, _ = encode_proxy(
        model.state_dict(), policy, visible, bit_width=4, block_size=64
    )
    other = build_model("cnn", 0.1, seed=0, spec=InputSpec("image", (1, 28, 28), 7))
    with pytest.raises(ValueError, match="fc2.weight"):
        decode_proxy(arrays, layout, into=other.state_dict())
    with pytest.raises(ValueError, match="no place to go"):
        decode_proxy(arrays, layout, into={})
    with pytest.raises(ValueError, match="no tensor for"):
        decode_proxy(arrays, layout, into={**model.state_dict(), "extra": torch.zeros(1)})


def test_masked_and_quantized_shares_of_the_default_policy():
    shares = {}
    for name, (spec, _, _) in CASES.items():
        model = build_model(name, 0.1, seed=0, spec=spec)
        shares[name] = policy_for_model(model).describe(model.state_dict())
    # the masked tensors hold most of every model's parameters
    assert shares["cnn"]["masked_share"] > 0.99
    assert shares["resnet18"]["masked_share"] > 0.99
    assert shares["transformer"]["masked_share"] > 0.9
    # ResNet's BatchNorm running statistics are not quantized
    assert shares["resnet18"]["quantized_share"] < 1.0
    assert shares["transformer"]["quantized_share"] == 1.0


def test_a_model_that_names_a_missing_tensor_is_refused():
    class Bad(torch.nn.Linear):
        def fedqsn_unit_axes(self):
            return {"nope.weight": 1}

    with pytest.raises(ValueError, match="nope.weight"):
        policy_for_model(Bad(3, 2))


def test_models_refuse_the_wrong_kind_of_data():
    with pytest.raises(ValueError, match="token ids"):
        build_model("transformer", spec=MNIST)
    with pytest.raises(ValueError, match="images"):
        build_model("resnet18", spec=TEXT)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", spec=MNIST)
