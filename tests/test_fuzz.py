"""A seeded fuzz test of the server: 1,200 mutated train replies, nothing escapes.

Honest replies of one round are mutated (bytes cut, padded or flipped; declared
shape, dtype and stype changed; arrays renamed, dropped or added; metrics
changed; replies duplicated). For every mutated round the strategy must not
raise, its new global model must equal -- bit for bit -- the aggregation of the
replies an independent oracle (numpy's own ``np.load``, written here) finds
valid, and the server-hidden units must not move.
"""

import io
import logging
import math
import re
from collections import Counter

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedqsn_flwr.app.config import validate
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.server import build_strategy, train_config
from fedqsn_flwr.core.aggregation import ClientUpdate, apply_updates
from fedqsn_flwr.core.masking import unit_scale
from fedqsn_flwr.flower.protocol import (
    METRICS_RECORD,
    UPDATE_RECORD,
)
from tests.helpers import TEST_SECRET, LocalGrid

ROUNDS = 500  # mutated rounds; 3 replies each, at least one mutated per round
MAX_EXAMPLES = 10_000


def _oracle_update(message, spec, policy):
    """The reply's update if valid, by numpy's own reading of the bytes; else None."""
    content = message.content
    if message.has_error() or UPDATE_RECORD not in content.array_records:
        return None
    if METRICS_RECORD not in content.metric_records:
        return None
    weight = content.metric_records[METRICS_RECORD].get("num-examples")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return None
    if not (math.isfinite(weight) and 0 < weight <= MAX_EXAMPLES):
        return None
    record = content.array_records[UPDATE_RECORD]
    if set(record.keys()) != set(spec.update_shapes):
        return None
    deltas = {}
    for name, shape in spec.update_shapes.items():
        array = record[name]
        if array.stype != "numpy.ndarray" or array.dtype != "float32":
            return None
        if tuple(array.shape) != tuple(shape):
            return None
        try:
            values = np.load(io.BytesIO(array.data), allow_pickle=False)
        except Exception:
            return None
        if values.dtype != np.float32 or values.shape != tuple(shape):
            return None
        if not np.isfinite(values).all():
            return None
        delta = torch.from_numpy(values.copy())
        if name in policy.unit_axes:
            delta = delta / unit_scale(policy.unit_counts[name], spec.visible[name])
        deltas[name] = delta
    return ClientUpdate(deltas=deltas, visible=spec.visible, weight=float(weight))


def _mutate(rng, message, origin):
    """One to three random mutations of a reply; returns the new reply and their names."""
    arrays = {k: message.content[UPDATE_RECORD][k] for k in message.content[UPDATE_RECORD].keys()}
    metrics = dict(message.content[METRICS_RECORD])
    names = []
    for _ in range(int(rng.integers(1, 4))):
        kind = str(rng.choice(MUTATIONS))
        names.append(kind)
        key = str(rng.choice(sorted(arrays))) if arrays else None
        if key is None and kind not in ("metrics", "drop-metrics", "extra-array"):
            continue
        if kind in ("cut", "pad", "flip"):
            data = bytearray(arrays[key].data)
            if kind == "cut":
                data = data[: int(rng.integers(0, len(data)))]
            elif kind == "pad":
                data += bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
            else:
                for index in rng.integers(0, len(data), int(rng.integers(1, 4))):
                    data[index] ^= 1 << int(rng.integers(0, 8))
            arrays[key] = _array(arrays[key].dtype, arrays[key].shape, arrays[key].stype, data)
        elif kind == "shape":
            shape = list(arrays[key].shape) or [1]
            shape[int(rng.integers(0, len(shape)))] += int(rng.choice([-1, 1, 2]))
            shape = [max(0, s) for s in shape]
            arrays[key] = _array(arrays[key].dtype, shape, arrays[key].stype, arrays[key].data)
        elif kind == "dtype":
            dtype = str(rng.choice(["float16", "float64", "int32", "uint8", "bogus"]))
            arrays[key] = _array(dtype, arrays[key].shape, arrays[key].stype, arrays[key].data)
        elif kind == "stype":
            arrays[key] = _array(
                arrays[key].dtype, arrays[key].shape, "torch.Tensor", arrays[key].data
            )
        elif kind == "rename":
            arrays[key + ".x"] = arrays.pop(key)
        elif kind == "drop":
            arrays.pop(key)
        elif kind == "extra-array":
            arrays[f"extra{int(rng.integers(0, 99))}"] = Array(rng.standard_normal(3).astype("f4"))
        elif kind == "values":
            try:
                values = np.load(io.BytesIO(arrays[key].data), allow_pickle=False).copy()
            except Exception:  # already mangled by an earlier mutation
                continue
            if values.size == 0 or values.dtype.kind != "f":
                continue
            values.flat[int(rng.integers(0, values.size))] = rng.choice([np.nan, np.inf, 1e30])
            arrays[key] = Array(values.astype(np.float32))
        elif kind == "metrics":
            metrics = dict(metrics or {})
            value = float(rng.choice([math.nan, math.inf, -1, 0, 1e12, 7.5, 3]))
            # MetricRecord keeps ints and floats apart; a client may send either
            metrics["num-examples"] = (
                int(value) if math.isfinite(value) and value.is_integer() else value
            )
        elif kind == "drop-metrics":
            metrics = None
    content = RecordDict({UPDATE_RECORD: ArrayRecord(arrays)})
    if metrics is not None:
        content[METRICS_RECORD] = MetricRecord(metrics)
    return Message(content, reply_to=origin), names


MUTATIONS = [
    "cut",
    "pad",
    "flip",
    "shape",
    "dtype",
    "stype",
    "rename",
    "drop",
    "extra-array",
    "values",
    "metrics",
    "drop-metrics",
]


def _array(dtype, shape, stype, data):
    array = Array(dtype=str(dtype), shape=tuple(int(s) for s in shape), stype=stype, data=b"x")
    array.data = bytes(data)
    return array


class _Reasons(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.reasons = Counter()

    def emit(self, record):
        text = record.getMessage()
        if "rejected reply" in text:
            reason = text.split(": ", 2)[2]
            reason = re.sub(r"\[.*\]|'[^']*'|\(.*\)|-?\b\d[\w.+-]*", "_", reason)
            self.reasons[reason[:50]] += 1


def test_fuzzed_replies_never_escape_and_the_model_is_the_valid_replies_aggregate(base_config):
    config = validate(
        {
            **base_config,
            "fraction-evaluate": 0.0,
            "min-nodes": 3,
            "server-mask-ratio": 0.3,
            "client-mask-ratio": 0.2,
            "update-bit-width": 32,
            "max-num-examples": MAX_EXAMPLES,
        }
    )
    torch.manual_seed(0)
    model = build_model("cnn")
    strategy = build_strategy(config, model, None, server_secret=TEST_SECRET)
    strategy.max_update_norm_ratio = math.inf  # the oracle checks validation, not outliers
    state = model.state_dict()
    grid = LocalGrid(3, config)
    messages = list(strategy.configure_train(1, ArrayRecord(state), train_config(config), grid))
    origins = {m.metadata.dst_node_id: m for m in messages}
    honest = grid.send_and_receive(messages)
    sent, sampled = dict(strategy._sent), {k: set(v) for k, v in strategy.nodes.sampled.items()}
    hidden = {
        name: torch.tensor(
            sorted(set(range(strategy.policy.unit_counts[name])) - set(units.tolist()))
        )
        for name, units in strategy.server_mask.items()
    }
    handler = _Reasons()
    logging.getLogger("flwr").addHandler(handler)
    rng = np.random.default_rng(2026)
    mutated = escaped = valid_mutants = 0
    kinds = Counter()
    try:
        for _ in range(ROUNDS):
            strategy._sent = dict(sent)
            strategy.nodes.sampled = {k: set(v) for k, v in sampled.items()}
            replies = []
            kinds_now = []
            chosen = rng.random(3) < 0.6
            chosen[int(rng.integers(0, 3))] = True
            for reply, mutate in zip(honest, chosen, strict=True):
                if mutate:
                    reply, names = _mutate(rng, reply, origins[reply.metadata.src_node_id])
                    kinds.update(names)
                    kinds_now.append(names)
                    mutated += 1
                replies.append(reply)
            if rng.random() < 0.1:  # a duplicate of the first reply: only the first counts
                replies.append(replies[0])
            valid = []
            for reply in replies:
                node = reply.metadata.src_node_id
                if node in {r.metadata.src_node_id for r, _ in valid}:
                    continue
                update = _oracle_update(reply, sent[node], strategy.policy)
                if update is not None:
                    valid.append((reply, update))
            valid_mutants += sum(1 for r, _ in valid if r not in honest)
            try:
                arrays, _ = strategy.aggregate_train(1, replies)
            except Exception:  # noqa: BLE001 - counting what must never happen
                escaped += 1
                continue
            if not valid:
                assert arrays is None, kinds_now
                continue
            # the strategy sums in partition order; so does the expected aggregate
            valid.sort(key=lambda pair: strategy.partition_ids[pair[0].metadata.src_node_id])
            expected = apply_updates(state, [u for _, u in valid], strategy.policy)
            got = arrays.to_torch_state_dict()
            for name, tensor in expected.items():
                assert torch.equal(got[name], tensor), name
            for name, units in hidden.items():
                axis = strategy.policy.unit_axes[name]
                assert torch.equal(
                    got[name].index_select(axis, units), state[name].index_select(axis, units)
                )
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    print(
        f"\nfuzz: {mutated} mutated replies in {ROUNDS} rounds; mutations {dict(kinds)}; "
        f"valid after mutation {valid_mutants}; rejected by reason "
        f"{dict(handler.reasons.most_common())}; escaped exceptions {escaped}"
    )
    assert mutated >= 1000
    assert escaped == 0
    assert sum(handler.reasons.values()) >= mutated - valid_mutants
