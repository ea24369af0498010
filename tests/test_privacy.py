"""Privacy invariant: no hidden weight is in any message a client receives."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.core.masking import policy_for_model
from fedqsn_flwr.flower.privacy import SimilarityReference, to_global_units
from fedqsn_flwr.flower.protocol import (
    LAYOUT_RECORD,
    PROXY_RECORD,
)
from fedqsn_flwr.flower.proxy import (
    decode_proxy,
    message_units,
)
from fedqsn_flwr.flower.strategies import FedQSN, message_bytes
from tests.helpers import TEST_SECRET, LocalGrid, rows_for

MARK = 1.0e4  # hidden weights are planted far outside the visible range


def _planted(strategy, state):
    """Global model whose server-hidden units hold MARK + noise; returns hidden indices."""
    hidden = {}
    for name, axis in strategy.policy.unit_axes.items():
        count = strategy.policy.unit_counts[name]
        keep = set(strategy.server_mask[name].tolist())
        idx = torch.tensor([u for u in range(count) if u not in keep], dtype=torch.long)
        noise = torch.rand(state[name].index_select(axis, idx).shape)
        state[name].index_copy_(axis, idx, MARK + noise)
        hidden[name] = set(idx.tolist())
    return hidden


def _cnn_and_strategy(bits, **fedavg_kwargs):
    """The CNN (seed 0) and a FedQSN for 4 nodes at p1 = 0.3, p2 = 0.2."""
    torch.manual_seed(0)
    model = build_model("cnn")
    strategy = FedQSN(
        policy_for_model(model),
        server_mask_ratio=0.3,
        client_mask_ratio=0.2,
        bit_width=bits,
        block_size=64,
        seed=3,
        server_secret=TEST_SECRET,
        privacy_metrics=True,
        min_train_nodes=4,
        min_available_nodes=4,
        **fedavg_kwargs,
    )
    return model, strategy


@pytest.mark.parametrize("bits", [4, None])
def test_train_and_evaluate_messages_carry_no_hidden_unit(base_config, bits):
    model, strategy = _cnn_and_strategy(bits, fraction_evaluate=1.0, min_evaluate_nodes=4)
    state = model.state_dict()
    hidden = _planted(strategy, state)
    assert all(hidden.values())
    full = ArrayRecord(state)
    grid = LocalGrid(4, base_config)
    messages = list(strategy.configure_train(1, full, ConfigRecord(), grid))
    messages += list(strategy.configure_evaluate(1, full, ConfigRecord(), grid))
    assert len(messages) == 8
    full_bytes = sum(t.numel() * 4 for t in state.values())
    global_arrays = [t.numpy() for t in state.values()]
    global_arrays += [
        t.index_select(strategy.policy.unit_axes[n], strategy.server_mask[n]).numpy()
        for n, t in state.items()
        if n in strategy.policy.unit_axes
    ]

    for message in messages:
        assert "arrays" not in message.content.array_records  # never the plain global model
        arrays = message.content[PROXY_RECORD]
        for name, units in message_units(arrays, message.content[LAYOUT_RECORD]).items():
            assert not set(units.tolist()) & hidden[name], f"the message shows hidden {name}"
        for key in arrays.keys():
            value = arrays[key].numpy()
            if value.dtype in (np.float32, np.float16):
                # raw values or per-block scales: a hidden weight would push them to MARK
                assert np.abs(value).max() < MARK / 10, f"{key} carries a hidden value"
                if bits is None and key not in strategy.policy.unit_axes:
                    continue  # unquantized, unmasked tensors (FedSN) are sent as they are
                for g in global_arrays:
                    assert not (g.shape == value.shape and np.array_equal(g, value)), key
        # hidden units are absent, not zeros: the message is smaller than the masked slices
        assert message_bytes(message) < full_bytes * (0.7 if bits is None else 0.2)
        proxy = decode_proxy(arrays, message.content[LAYOUT_RECORD])
        for name, tensor in proxy.state.items():
            if bits is not None or name in hidden:
                assert not torch.equal(tensor, state[name]), f"{name} equals the global tensor"
            if name in hidden:
                axis = strategy.policy.unit_axes[name]
                idx = torch.tensor(sorted(hidden[name]))
                assert torch.all(tensor.index_select(axis, idx) == 0)
        assert max(float(t.abs().max()) for t in proxy.state.values()) < MARK / 10


def test_hidden_units_of_the_global_model_never_move(base_config):
    torch.manual_seed(0)
    model = build_model("cnn")
    strategy = FedQSN(
        policy_for_model(model),
        server_mask_ratio=0.3,
        client_mask_ratio=0.2,
        bit_width=4,
        block_size=64,
        seed=3,
        server_secret=TEST_SECRET,
        fraction_evaluate=0.0,
        min_train_nodes=3,
        min_available_nodes=3,
        node_config_fn=rows_for(base_config),
        partition_query=True,
    )
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = strategy.start(LocalGrid(3, base_config), ArrayRecord(start), num_rounds=2)
    final = result.arrays.to_torch_state_dict()
    for name, axis in strategy.policy.unit_axes.items():
        keep = set(strategy.server_mask[name].tolist())
        idx = torch.tensor([u for u in range(strategy.policy.unit_counts[name]) if u not in keep])
        assert torch.equal(final[name].index_select(axis, idx), start[name].index_select(axis, idx))
        visible = strategy.server_mask[name]
        assert not torch.equal(
            final[name].index_select(axis, visible), start[name].index_select(axis, visible)
        )


@pytest.mark.parametrize(("bits", "compared"), [(4, 0), (3, 0), (None, 0), (4, 1), (4, 2)])
def test_logged_similarity_is_that_of_the_decoded_messages(base_config, bits, compared):
    """The server's figures (computed from the codes) describe what clients decode.

    ``compared``: ``privacy_proxies``, the proxies measured per round (0: all).
    """
    model, strategy = _cnn_and_strategy(bits, privacy_proxies=compared)
    state = model.state_dict()
    messages = list(
        strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), LocalGrid(4, base_config))
    )
    measured = messages[:compared] if compared else messages
    reference = SimilarityReference(state, list(strategy.policy.unit_axes))
    expected: dict[str, float] = {}
    for message in measured:
        proxy = decode_proxy(message.content[PROXY_RECORD], message.content[LAYOUT_RECORD])
        for key, value in reference(to_global_units(proxy)).items():
            expected[key] = expected.get(key, 0.0) + value / len(measured)
    logged = strategy.round_log[1]
    assert expected["cosine_masked"] < 0.99  # masks and codes moved the proxy away
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # exposure counts every message, measured or not
    exposed = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in state.items()}
    for message in messages:
        proxy = decode_proxy(message.content[PROXY_RECORD], message.content[LAYOUT_RECORD])
        for name, axis in strategy.policy.unit_axes.items():
            exposed[name].index_fill_(axis, proxy.visible[name], True)
        for name in state:
            if name not in strategy.policy.unit_axes:
                exposed[name][...] = True
    floats = [n for n, t in state.items() if t.is_floating_point()]
    share = sum(int(exposed[n].sum()) for n in floats) / sum(state[n].numel() for n in floats)
    assert logged["exposure"] == pytest.approx(share)


def test_unmasked_codes_measured_before_are_reused_only_when_equal():
    """A reference measures an unmasked tensor once per distinct codes, with equal figures."""
    from fedqsn_flwr.core.masking import draw_client_mask, draw_server_mask
    from fedqsn_flwr.core.secret import derive_seed
    from fedqsn_flwr.flower.proxy import encode_proxy, iter_packed

    torch.manual_seed(0)
    model = build_model("cnn")
    policy = policy_for_model(model)
    state = model.state_dict()
    server = draw_server_mask(policy, 0.3, 1)
    moved = {k: v.clone() for k, v in state.items()}
    unmasked = next(n for n in policy.quantized if n not in policy.unit_axes)
    moved[unmasked] += 0.01  # other codes for an unmasked tensor
    reference = SimilarityReference(state, list(policy.unit_axes))
    for client, source in enumerate((state, state, moved, state)):
        visible = draw_client_mask(server, 0.2, derive_seed("test", client))
        arrays, layout, _ = encode_proxy(source, policy, visible, bit_width=4, block_size=64)
        found = reference.compare_packed(iter_packed(arrays, layout), 4, 64)
        fresh = SimilarityReference(state, list(policy.unit_axes))
        assert found == fresh.compare_packed(iter_packed(arrays, layout), 4, 64)


def test_exposure_marks_collected_per_unit_fill_the_dense_masks_as_before():
    from fedqsn_flwr.flower.privacy import ExposureTracker

    torch.manual_seed(0)
    model = build_model("cnn")
    policy = policy_for_model(model)
    state = model.state_dict()
    tracker = ExposureTracker(state, policy)
    expected = {n: torch.zeros(shape, dtype=torch.bool) for n, shape in tracker.shapes.items()}
    generator = torch.Generator().manual_seed(3)
    for step in range(3):
        for name, shape in tracker.shapes.items():
            axis = policy.unit_axes.get(name, -1)
            if axis < 0:
                if step == 1:
                    tracker.add_tensor(name, -1, None)
                    expected[name][...] = True
                continue
            units = torch.randperm(shape[axis], generator=generator)[: shape[axis] // 3]
            tracker.add_tensor(name, axis, units)
            expected[name].index_fill_(axis, units, True)
        # read between marks, and marks after reading, both count
        assert all(torch.equal(tracker.seen[n], expected[n]) for n in expected)
        total = sum(int(m.sum()) for m in expected.values()) / tracker.total
        assert tracker.exposure == total
    restored = ExposureTracker(state, policy)
    restored.seen = {n: m.clone() for n, m in tracker.seen.items()}
    assert restored.exposure == tracker.exposure
