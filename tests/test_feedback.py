"""Hidden-unit feedback: wire format, the control-variate step, and its guard rails."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedqsn_flwr.app.base import Split
from fedqsn_flwr.app.config import ConfigError, validate
from fedqsn_flwr.app.models import DIGITS_SPEC, build_model
from fedqsn_flwr.app.server import build_strategy, feedback_fns, train_config
from fedqsn_flwr.app.sources import data_key
from fedqsn_flwr.app.splits import ServerData, load_server_data
from fedqsn_flwr.core.feedback import (
    ClientFeedback,
    feedback_direction,
    guarded_feedback,
    hidden_slices,
    local_steps,
)
from fedqsn_flwr.core.masking import (
    MaskPolicy,
    draw_client_mask,
    draw_server_mask,
    policy_for_model,
)
from fedqsn_flwr.core.secret import from_text
from fedqsn_flwr.flower.protocol import (
    FEEDBACK_RECORD,
    METRICS_RECORD,
)
from fedqsn_flwr.flower.proxy import (
    InvalidUpdate,
    decode_feedback,
    decode_proxy,
    encode_feedback,
    encode_proxy,
    hidden_units,
)
from tests.helpers import LocalGrid

SECRET = from_text("feedback tests")


def _proxy_pair(update_bit_width=32):
    torch.manual_seed(0)
    model = build_model("cnn")
    policy = policy_for_model(model)
    visible = draw_client_mask(draw_server_mask(policy, 0.5, 1), 0.2, 2)
    arrays, layout, spec = encode_proxy(
        model.state_dict(),
        policy,
        visible,
        bit_width=4,
        block_size=64,
        update_bit_width=update_bit_width,
    )
    return model, policy, decode_proxy(arrays, layout), spec


@pytest.mark.parametrize("update_bit_width", [32, 16, 8])
def test_feedback_round_trip_holds_exactly_the_hidden_slices(update_bit_width):
    model, policy, proxy, spec = _proxy_pair(update_bit_width)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    record = encode_feedback(grads, proxy)
    decoded = decode_feedback(record, spec, policy)
    assert set(decoded) == set(policy.unit_axes)
    tolerance = {32: 0.0, 16: 1e-2, 8: 0.1}[update_bit_width]
    for name, axis in policy.unit_axes.items():
        hidden = hidden_units(policy.unit_counts[name], spec.visible[name])
        expected = grads[name].index_select(axis, hidden)
        assert decoded[name].shape == expected.shape
        scale = float(expected.abs().max())
        assert float((decoded[name] - expected).abs().max()) <= tolerance * scale


def test_bad_feedback_is_refused():
    model, policy, proxy, spec = _proxy_pair()
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    good = encode_feedback(grads, proxy)
    arrays = {k: good[k] for k in good.keys()}
    missing = dict(arrays)
    missing.pop("fc1.weight")
    extra = {**arrays, "fc1.bias": Array(np.zeros(128, np.float32))}
    nan = dict(arrays)
    nan["fc1.weight"] = Array(np.full(arrays["fc1.weight"].shape, np.nan, np.float32))
    short = dict(arrays)
    short["fc1.weight"] = Array(np.zeros((3, 3), np.float32))
    for bad, reason in [
        (missing, "missing"),
        (extra, "unexpected"),
        (nan, "NaN"),
        (short, "shape"),
    ]:
        with pytest.raises(InvalidUpdate, match=reason):
            decode_feedback(ArrayRecord(bad), spec, policy)


def test_direction_is_the_control_variate_and_clips_each_client():
    full = {"w": torch.tensor([[1.0, 2.0]])}
    honest = ClientFeedback({"w": torch.tensor([[3.0, 0.0]])}, {"w": torch.tensor([[1.0, 0.0]])})
    other = ClientFeedback({"w": torch.tensor([[0.0, 1.0]])}, {"w": torch.tensor([[0.0, 2.0]])})
    direction = feedback_direction([honest, other], full, clip=5.0)
    # full + ((g - ref) + (g - ref)) / 2: every reply counts the same
    expected = torch.tensor([[1.0 + 0.5 * 2.0, 2.0 + 0.5 * -1.0]])
    assert torch.allclose(direction["w"], expected)
    huge = ClientFeedback({"w": torch.tensor([[1e9, 0.0]])}, {"w": torch.tensor([[1.0, 0.0]])})
    clipped = feedback_direction([huge], full, clip=5.0)
    assert torch.allclose(clipped["w"], torch.tensor([[1.0 + 5.0 - 1.0, 2.0]]))


def test_local_steps_follow_the_low_median_claim():
    # one claim among three cannot raise the step above an honest client's
    assert local_steps([100, 120, 100_000], epochs=2, batch_size=32) == 2 * 4
    assert local_steps([100, 100_000], epochs=1, batch_size=32) == 4
    assert local_steps([64], epochs=3, batch_size=32) == 6


def test_guard_halves_a_step_that_raises_the_held_out_loss_and_drops_a_useless_one():
    policy = MaskPolicy(unit_axes={"w": 1}, unit_counts={"w": 2})
    state = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    hidden = {"w": torch.tensor([1])}  # input unit 1: column 1
    direction = {"w": torch.ones(2, 1)}

    def loss_at_minus_one(s):  # held-out loss, least where the hidden entries are -1
        return float((s["w"][:, 1] + 1).pow(2).sum())

    stepped, kept = guarded_feedback(state, policy, hidden, direction, 1.0, loss_at_minus_one)
    assert kept == 1.0 and float(stepped["w"].sum()) == -2.0
    # a step of 8 overshoots to -8 (loss 98 > 2); 4 to -4 (18); 2 to -2 (2 <= 2): kept
    stepped, kept = guarded_feedback(state, policy, hidden, direction, 8.0, loss_at_minus_one)
    assert kept == 0.25 and float(stepped["w"].sum()) == -4.0
    # a direction that only raises the loss is dropped: the state comes back unchanged
    stepped, kept = guarded_feedback(
        state, policy, hidden, direction, -1.0, loss_at_minus_one, tolerance=0.0
    )
    assert kept == 0.0 and torch.equal(stepped["w"], state["w"])
    # within the tolerance a small rise is kept: -1/32 raises the loss 2 -> 2.127 (6.3%)
    _, kept = guarded_feedback(state, policy, hidden, direction, -1.0, loss_at_minus_one, 0.02)
    assert kept == 0.0
    _, kept = guarded_feedback(state, policy, hidden, direction, -1.0, loss_at_minus_one, 0.07)
    assert kept == 1 / 32


def _federation(base_config, feedback, tamper=None):
    config = validate(
        {
            **base_config,
            "fraction-evaluate": 0.0,
            "min-nodes": 3,
            "server-mask-ratio": 0.5,
            "hidden-feedback": feedback,
        }
    )
    torch.manual_seed(0)
    model = build_model("cnn")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = load_server_data(
        data_key(config),
        seed=config["seed"],
        test_fraction=config["test-fraction"],
        pretrain_fraction=config["pretrain-fraction"],
        secret=SECRET,
    )
    fns = feedback_fns(config, model, data, SECRET) if feedback else None
    strategy = build_strategy(config, model, None, None, SECRET, fns)
    grid = LocalGrid(3, config, tamper=tamper)
    result = strategy.start(
        grid, ArrayRecord(start), num_rounds=1, train_config=train_config(config)
    )
    return strategy, start, result.arrays.to_torch_state_dict(), grid


def _server_hidden_change(strategy, start, final):
    moved = {}
    for name, axis in strategy.policy.unit_axes.items():
        hidden = strategy._server_hidden[name]
        moved[name] = (final[name] - start[name]).index_select(axis, hidden)
    return moved


def test_feedback_moves_only_server_hidden_units_by_the_control_variate_step(base_config):
    plain, start, without, _ = _federation(base_config, False)
    strategy, start2, with_feedback, grid = _federation(base_config, True)
    assert all(torch.equal(start[k], start2[k]) for k in start)
    # clients train the same proxies either way: every server-visible entry agrees
    for name, tensor in without.items():
        if name not in strategy.policy.unit_axes:
            assert torch.equal(tensor, with_feedback[name]), name
            continue
        axis, visible = strategy.policy.unit_axes[name], strategy.server_mask[name]
        assert torch.equal(
            tensor.index_select(axis, visible), with_feedback[name].index_select(axis, visible)
        )
    # without feedback hidden units keep their values; with it they move
    assert all(
        float(d.abs().max()) == 0 for d in _server_hidden_change(plain, start, without).values()
    )
    moved = _server_hidden_change(strategy, start, with_feedback)
    assert all(float(d.abs().max()) > 0 for d in moved.values())
    # ... by exactly -step * direction, recomputed here from the messages
    gradient_fn = strategy.feedback.gradient_fn
    hidden = strategy._server_hidden
    feedback, claims = [], []
    for sent, reply in zip(grid.sent[-3:], grid.replies[-3:], strict=True):
        proxy = decode_proxy(sent.content["proxy"], sent.content["proxy-layout"])
        ref = hidden_slices(gradient_fn(proxy.state), strategy.policy, hidden)
        spec_visible = proxy.visible
        raw = reply.content[FEEDBACK_RECORD]
        g = {}
        for name, axis in strategy.policy.unit_axes.items():
            among = hidden_units(strategy.policy.unit_counts[name], spec_visible[name])
            values = torch.from_numpy(raw[name].numpy().astype(np.float32))
            g[name] = values.index_select(axis, torch.searchsorted(among, hidden[name]))
        feedback.append(ClientFeedback(g, ref))
        claims.append(float(reply.content[METRICS_RECORD]["num-examples"]))
    full = hidden_slices(gradient_fn(start), strategy.policy, hidden)
    direction = feedback_direction(feedback, full, strategy.feedback.clip)
    config = train_config(validate({**base_config}))
    steps = config["local-epochs"] * math.ceil(sorted(claims)[1] / config["batch-size"])
    kept = strategy.round_log[1]["feedback_kept"]
    assert kept > 0  # the guard kept (some of) the step: the test checks its size
    step = kept * config["learning-rate"] * steps
    for name in moved:
        assert torch.allclose(moved[name], -step * direction[name], rtol=1e-4, atol=1e-6), name


def _drop_feedback(reply):
    content = RecordDict({k: v for k, v in reply.content.items() if k != FEEDBACK_RECORD})
    return Message(content, reply_to=_ORIGIN[reply.metadata.src_node_id])


def _huge_feedback(reply):
    record = reply.content[FEEDBACK_RECORD]
    arrays = {k: Array(record[k].numpy() * np.float16(1e3)) for k in record.keys()}
    content = RecordDict({**dict(reply.content.items()), FEEDBACK_RECORD: ArrayRecord(arrays)})
    return Message(content, reply_to=_ORIGIN[reply.metadata.src_node_id])


_ORIGIN = {}


def _remember_origins(monkeypatch):
    original = LocalGrid.send_and_receive

    def remember(self, messages, timeout=None):
        messages = list(messages)
        for m in messages:
            _ORIGIN[m.metadata.dst_node_id] = m
        return original(self, messages, timeout)

    monkeypatch.setattr(LocalGrid, "send_and_receive", remember)


def test_a_reply_without_its_feedback_is_skipped(base_config, monkeypatch):
    _remember_origins(monkeypatch)
    strategy, _, _, _ = _federation(base_config, True, tamper={1: _drop_feedback})
    assert strategy.round_log[1]["num_aggregated"] == 2


def test_one_malicious_feedback_moves_hidden_units_no_further_than_the_clip(
    base_config, monkeypatch
):
    _remember_origins(monkeypatch)
    strategy, start, final, _ = _federation(base_config, True, tamper={0: _huge_feedback})
    assert strategy.round_log[1]["num_aggregated"] == 3
    moved = _server_hidden_change(strategy, start, final)
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in moved.values()))
    # |step * direction| <= step * (|g_full| + sum_c w_c/W (clip + 1) |g_p,c|)
    refs = list(strategy.feedback.references.values())
    ref_norms = [math.sqrt(sum(float(t.double().pow(2).sum()) for t in r.values())) for r in refs]
    full = strategy.feedback.full_gradient
    full_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in full.values()))
    step = strategy.feedback.step * strategy.feedback.learning_rate * 100  # generous on local steps
    bound = step * (full_norm + (strategy.feedback.clip + 1) * max(ref_norms))
    assert math.isfinite(norm) and norm <= bound


def test_feedback_needs_server_data(base_config):
    config = validate({**base_config, "hidden-feedback": True})
    empty = Split(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    data = ServerData(test=empty, pretrain=empty, pool=empty, spec=DIGITS_SPEC)
    with pytest.raises(ConfigError, match="server's own"):
        feedback_fns(config, build_model("cnn"), data, SECRET)


def _claims(num_examples):
    """A reply whose only change is its claimed number of examples."""

    def tamper(reply):
        metrics = dict(reply.content[METRICS_RECORD])
        content = dict(reply.content.items())
        content[METRICS_RECORD] = MetricRecord({**metrics, "num-examples": num_examples})
        return Message(RecordDict(content), reply_to=_ORIGIN[reply.metadata.src_node_id])

    return tamper


def _norm(tensors):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def test_a_claim_of_100000_examples_moves_hidden_units_no_further_than_an_honest_reply(
    base_config, monkeypatch
):
    _remember_origins(monkeypatch)
    honest, start, final, grid = _federation(base_config, True)
    claims = [float(r.content[METRICS_RECORD]["num-examples"]) for r in grid.replies[-3:]]
    claimed, _, final_claimed, _ = _federation(base_config, True, tamper={0: _claims(100_000)})
    assert claimed.round_log[1]["num_aggregated"] == 3

    def direction(strategy):
        replies = strategy.feedback.replies
        feedback = [replies[n] for n in sorted(replies)]
        return feedback_direction(feedback, strategy.feedback.full_gradient, strategy.feedback.clip)

    # the claim does not weigh in the direction: every reply counts the same ...
    honest_direction, claimed_direction = direction(honest), direction(claimed)
    for name, values in honest_direction.items():
        assert torch.allclose(values, claimed_direction[name], rtol=1e-5, atol=1e-7), name
    # ... nor stretch the step beyond what honest claims give (the low median of 3)
    config = validate({**base_config})
    longest = config["learning-rate"] * local_steps(
        [max(claims)], config["local-epochs"], config["batch-size"]
    )
    honest_move = _norm(_server_hidden_change(honest, start, final))
    claimed_move = _norm(_server_hidden_change(claimed, start, final_claimed))
    assert 0 < claimed_move <= longest * _norm(honest_direction) * (1 + 1e-5)
    print(
        f"claims {claims}; hidden units moved {honest_move:.4g} (honest), "
        f"{claimed_move:.4g} (one claims 100,000); hidden-unit norm "
        f"{_norm(_server_hidden_change(honest, {k: 0 * v for k, v in start.items()}, start)):.4g}"
    )
