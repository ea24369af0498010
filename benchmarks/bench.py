"""Benchmarks of FedQSN's costs, each against a baseline measured in the same run.

Run on demand (not part of the tests)::

    python benchmarks/bench.py [--json results.json] [--repeats 5] [--skip-large]
    python benchmarks/bench.py --only large-server [--json server.json]
    python benchmarks/bench.py --scale [--nodes 1000] [--json scale.json]

Every case prints ``value``, ``baseline``, ``ratio = value / baseline`` and the
target on the ratio, because absolute times on a shared machine are not
comparable between runs. Times are the best of ``--repeats`` runs, ours and the
baseline's interleaved so that load changes hit both.

Cases (suffix: the tensor or model measured):

* ``quantize_pack_vs_bnb``: NF4 quantize + pack alone vs bitsandbytes'
  ``quantize_4bit`` (throughput, parameters/s; higher is better);
* ``proxy_build_vs_bnb`` / ``proxy_build_vs_clone``: building the proxy (server
  and client mask, unit scaling, quantize, pack, Flower arrays) vs the same;
* ``unpack_vs_bnb`` / ``unpack_vs_clone``: the client's rebuild of the dense
  proxy into its model's tensors vs ``dequantize_4bit`` / ``clone()``, and
  ``unpack_new_tensors_vs_clone``: the same into new tensors;
* ``bytes_down_vs_fedavg`` / ``bytes_up_vs_fedavg``: serialized Flower messages
  per client per round vs FedAvg's; the uplink with ``update-bit-width`` 16, plus
  float32 and NF4 uplinks for reference;
* ``round_overhead_vs_fedavg``: wall time of a training round (server work and
  the real client handlers, in-process) vs FedAvg's, and
  ``server_seconds_per_client``: configure_train + aggregate_train per client,
  vs FedAvg's and, on the ~100 M model, vs building one proxy
  (``server_seconds_per_client_vs_proxy_build``; ``--only large-server`` runs
  just these two);
* ``hf``: a RoBERTa-base-sized classifier and a GPT-2-sized language model
  (transformers, default configs, random weights; GPT-2's tied head travels
  once): proxy build vs FedAvg's message, client decode vs FedAvg's load, and
  the server's seconds per client vs FedAvg's and vs one proxy build
  (``--only hf`` runs just these);
* ``peak_memory_20_proxies``: extra peak memory (RSS) of building the messages
  of 20 clients, in a fresh process, vs the bytes of those messages.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fedqsn_flwr.core.masking import (
    MaskPolicy,
    derive_seed,
    draw_client_mask,
    draw_server_mask,
    policy_for_model,
)
from fedqsn_flwr.core.secret import from_text
from fedqsn_flwr.flower.protocol import (
    LAYOUT_RECORD,
    METRICS_RECORD,
    PROXY_RECORD,
)
from fedqsn_flwr.flower.proxy import (
    decode_proxy,
    encode_proxy,
    encode_update,
)
from fedqsn_flwr.flower.strategies import message_bytes

P1 = P2 = 0.1
BIT_WIDTH, BLOCK_SIZE = 4, 64
#: Fixed server secret: the benchmark sends the same proxies in every run.
BENCH_SECRET = from_text("fedqsn-flwr benchmark")


@dataclass
class Case:
    """One benchmark figure (the JSON schema of ``--json``)."""

    case: str
    value: float
    baseline: float
    ratio: float
    target: str
    device: str
    unit: str
    detail: str = ""

    def met(self) -> bool | None:
        """Whether the ratio meets the target (None when there is none)."""
        if not self.target.startswith(("<=", ">=")):
            return None
        bound = float(self.target[2:])
        return self.ratio <= bound if self.target.startswith("<=") else self.ratio >= bound


def _case(
    case: str,
    value: float,
    baseline: float,
    target: str,
    device: str,
    unit: str,
    detail: str = "",
) -> Case:
    return Case(case, value, baseline, value / baseline, target, device, unit, detail)


class BertBaseLike(nn.Module):
    """A BERT-base-sized stack of layers (about 109 M parameters, no forward pass).

    A 30,522 x 768 embedding and 12 blocks of attention projections (query, key,
    value, output: 768 x 768) and an MLP (768 -> 3072 -> 768), with biases.
    """

    def __init__(self, vocab: int = 30522, hidden: int = 768, ffn: int = 3072) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "query": nn.Linear(hidden, hidden),
                    "key": nn.Linear(hidden, hidden),
                    "value": nn.Linear(hidden, hidden),
                    "output": nn.Linear(hidden, hidden),
                    "up": nn.Linear(hidden, ffn),
                    "down": nn.Linear(ffn, hidden),
                }
            )
            for _ in range(12)
        )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({torch.get_num_threads()} threads, {cpu})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory() -> None:
    """Hand freed memory back to the OS (glibc), so every timed call pays for its own.

    Without it a baseline ``clone()`` of the ~100 M model took 0.02 s or 0.13 s in
    the same run, depending on which freed blocks the allocator happened to keep
    from the call before: a 6x swing in the floor every ratio is taken against.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _best_times(
    functions: Mapping[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Best wall time of each function; runs are interleaved, after one warm-up each."""
    for function in functions.values():
        function()
    best = dict.fromkeys(functions, math.inf)
    for _ in range(repeats):
        for name, function in functions.items():
            _release_memory()
            _sync(device)
            started = time.perf_counter()
            function()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _client_mask(policy: MaskPolicy, seed: int = 0) -> dict[str, torch.Tensor]:
    server = draw_server_mask(policy, P1, seed)
    return draw_client_mask(server, P2, derive_seed("bench-client-mask", seed, 1, 1, 0))


def _tensor_policy(name: str, tensor: torch.Tensor) -> MaskPolicy:
    return MaskPolicy(
        unit_axes={name: 1}, unit_counts={name: tensor.shape[1]}, quantized=frozenset({name})
    )


def speed_cases(
    label: str,
    state: Mapping[str, torch.Tensor],
    policy: MaskPolicy,
    repeats: int,
    device: torch.device,
) -> list[Case]:
    """Proxy build and rebuild of ``state`` against bitsandbytes and ``clone()``."""
    import bitsandbytes.functional as bnb

    from fedqsn_flwr.core.quantization import quantize_packed

    dev = _device_name(device)
    state = {k: v.to(device) for k, v in state.items()}
    floats = [t for t in state.values() if t.is_floating_point()]
    numel = sum(t.numel() for t in state.values())
    visible = {k: v.to(device) for k, v in _client_mask(policy).items()}
    times = _best_times(
        {
            "build": lambda: encode_proxy(
                state, policy, visible, bit_width=BIT_WIDTH, block_size=BLOCK_SIZE
            ),
            "quantize_pack": lambda: [quantize_packed(t, BIT_WIDTH, BLOCK_SIZE) for t in floats],
            "bnb_quantize": lambda: [
                bnb.quantize_4bit(t, quant_type="nf4", blocksize=BLOCK_SIZE) for t in floats
            ],
            "clone": lambda: [t.clone() for t in state.values()],
        },
        repeats,
        device,
    )
    arrays, layout, _ = encode_proxy(
        state, policy, visible, bit_width=BIT_WIDTH, block_size=BLOCK_SIZE
    )
    quantized = [bnb.quantize_4bit(t, quant_type="nf4", blocksize=BLOCK_SIZE) for t in floats]
    model = {k: v.clone() for k, v in state.items()}  # the client's model, already touched
    unpack = _best_times(
        {
            "unpack": lambda: decode_proxy(arrays, layout, into=model),
            "unpack_new": lambda: decode_proxy(arrays, layout),
            "bnb_dequantize": lambda: [bnb.dequantize_4bit(q, s) for q, s in quantized],
            "clone": lambda: [t.clone() for t in state.values()],
        },
        repeats,
        device,
    )
    rate = "parameters/s"
    what = f"{numel:,} parameters, p1=p2={P1}, NF{BIT_WIDTH}, block {BLOCK_SIZE}"
    return [
        _case(
            f"quantize_pack_vs_bnb_{label}",
            numel / times["quantize_pack"],
            numel / times["bnb_quantize"],
            ">= 2",
            dev,
            rate,
            f"quantize + pack every value, no mask; {what}",
        ),
        _case(
            f"proxy_build_vs_bnb_{label}",
            numel / times["build"],
            numel / times["bnb_quantize"],
            ">= 2",
            dev,
            rate,
            f"mask + scale + quantize + pack + Flower arrays; {what}",
        ),
        _case(
            f"proxy_build_vs_clone_{label}",
            times["build"],
            times["clone"],
            "<= 8",
            dev,
            "seconds",
            what,
        ),
        _case(
            f"unpack_vs_bnb_{label}",
            numel / unpack["unpack"],
            numel / unpack["bnb_dequantize"],
            ">= 2",
            dev,
            rate,
            "the client's rebuild of the dense proxy (read the message, unpack, dequantize, "
            "scatter) into its model's tensors, as the client app does; bitsandbytes' CPU "
            f"dequantize_4bit has no out= variant and allocates its output; {what}",
        ),
        _case(
            f"unpack_vs_clone_{label}",
            unpack["unpack"],
            unpack["clone"],
            "<= 8",
            dev,
            "seconds",
            f"as unpack_vs_bnb; {what}",
        ),
        _case(
            f"unpack_new_tensors_vs_clone_{label}",
            unpack["unpack_new"],
            unpack["clone"],
            "report",
            dev,
            "seconds",
            f"decode_proxy into newly allocated tensors (page faults included); {what}",
        ),
    ]


def _train_config() -> ConfigRecord:
    return ConfigRecord(
        {"local-epochs": 5, "learning-rate": 0.05, "batch-size": 32, "server-round": 1}
    )


def byte_cases(label: str, state: Mapping[str, torch.Tensor], policy: MaskPolicy) -> list[Case]:
    """Serialized message sizes per client per round, FedQSN vs FedAvg."""
    fedavg_down = message_bytes(
        Message(
            RecordDict({"arrays": ArrayRecord(dict(state)), "config": _train_config()}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
    )
    metrics = MetricRecord({"num-examples": 100, "train-loss": 0.5})
    fedavg_up = message_bytes(
        Message(
            RecordDict({"arrays": ArrayRecord(dict(state)), METRICS_RECORD: metrics}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
    )
    visible = _client_mask(policy)
    cases = []
    ups: dict[int, int] = {}
    for update_bits in (16, 32, 4):
        proxy_arrays, layout, _ = encode_proxy(
            state,
            policy,
            visible,
            bit_width=BIT_WIDTH,
            block_size=BLOCK_SIZE,
            update_bit_width=update_bits,
        )
        down = message_bytes(
            Message(
                RecordDict(
                    {PROXY_RECORD: proxy_arrays, LAYOUT_RECORD: layout, "config": _train_config()}
                ),
                dst_node_id=1,
                message_type=MessageType.TRAIN,
            )
        )
        proxy = decode_proxy(proxy_arrays, layout)
        generator = torch.Generator().manual_seed(0)
        trained = {
            k: v + 1e-3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in proxy.state.items()
        }
        ups[update_bits] = message_bytes(
            Message(
                RecordDict({"update": encode_update(trained, proxy), METRICS_RECORD: metrics}),
                dst_node_id=1,
                message_type=MessageType.TRAIN,
            )
        )
        del proxy, trained, proxy_arrays
    detail = f"p1=p2={P1}, NF{BIT_WIDTH}, block {BLOCK_SIZE}, float16 scales"
    cases.append(
        _case(f"bytes_down_vs_fedavg_{label}", down, fedavg_down, "<= 0.12", "-", "bytes", detail)
    )
    cases.append(
        _case(
            f"bytes_up_vs_fedavg_{label}",
            ups[16],
            fedavg_up,
            "<= 0.5",
            "-",
            "bytes",
            "update-bit-width 16 (float16 visible units)",
        )
    )
    for bits, name in ((32, "float32"), (4, "nf4")):
        cases.append(
            _case(
                f"bytes_up_{name}_vs_fedavg_{label}",
                ups[bits],
                fedavg_up,
                "report",
                "-",
                "bytes",
                f"update-bit-width {bits}",
            )
        )
    return cases


def _bench_config(num_nodes: int) -> dict[str, Any]:
    from fedqsn_flwr.app.config import DEFAULTS, validate

    return validate(
        {
            **DEFAULTS,
            "fraction-evaluate": 0.0,
            "min-nodes": num_nodes,
            "save-messages": False,
            "device": "cpu",
        }
    )


def round_cases(rounds: int, num_nodes: int = 10) -> list[Case]:
    """Training rounds of the default config, FedQSN vs FedAvg, interleaved round by round."""
    from fedqsn_flwr.app.models import build_model
    from fedqsn_flwr.app.server import build_strategy, train_config
    from fedqsn_flwr.experiments.inprocess import InProcessGrid

    threads = torch.get_num_threads()
    federations = {}
    for name in ("fedavg", "fedqsn"):
        config = {**_bench_config(num_nodes), "strategy": name}
        model = build_model(config["model"], config["dropout"], seed=config["seed"])
        strategy = build_strategy(config, model, None, server_secret=BENCH_SECRET)
        federations[name] = (
            strategy,
            InProcessGrid(num_nodes, config, keep_messages=False),
            ArrayRecord(model.state_dict()),
        )
    walls: dict[str, list[float]] = {name: [] for name in federations}
    server = {name: 0.0 for name in federations}
    settings = train_config(_bench_config(num_nodes))
    warm_up = 2  # partition queries, compilation, the machine settling
    for server_round in range(1, rounds + warm_up + 1):
        # A-B, B-A, A-B, ...: the machine's speed drifts, and alternating which
        # strategy goes first cancels a steady drift within each pair of rounds
        order = list(federations)[:: 1 if server_round % 2 else -1]
        for name in order:
            strategy, grid, arrays = federations[name]
            started = time.perf_counter()
            messages = strategy.configure_train(server_round, arrays, settings, grid)
            replies = grid.send_and_receive(messages)
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            elapsed = time.perf_counter() - started
            federations[name] = (strategy, grid, new_arrays or arrays)
            if server_round <= warm_up:
                continue
            walls[name].append(elapsed)
            log = strategy.round_log[server_round]
            server[name] += log["configure_train_seconds"] + log["aggregate_train_seconds"]
    torch.set_num_threads(threads)  # the in-process clients switch to one thread
    # Every round does the same work; the median resists the machine's noise
    # (client training time alone varies by +-8% from round to round here).
    wall = {name: statistics.median(times) for name, times in walls.items()}
    dev = _device_name(torch.device("cpu"))
    detail = (
        f"default config, {num_nodes} clients, median of {rounds} rounds after {warm_up} "
        "warm-up rounds, the two strategies alternating round by round (A-B, B-A, ...)"
    )
    per_client = rounds * num_nodes
    return [
        _case(
            "round_overhead_vs_fedavg_digits-cnn",
            wall["fedqsn"],
            wall["fedavg"],
            "<= 1.10",
            dev,
            "seconds per round",
            detail + " (clients train in-process, one thread)",
        ),
        _case(
            "server_seconds_per_client_vs_fedavg_digits-cnn",
            server["fedqsn"] / per_client,
            server["fedavg"] / per_client,
            "report",
            dev,
            "seconds per client",
            detail + " (configure_train + aggregate_train, with privacy metrics)",
        ),
    ]


class _NodeGrid:
    """Answers partition queries for ``num_nodes`` nodes; never trains (server-only cases)."""

    def __init__(self, num_nodes: int) -> None:
        self.nodes = list(range(1, num_nodes + 1))

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            record = MetricRecord({"partition-id": node - 1, "num-partitions": len(self.nodes)})
            reply = Message(RecordDict({METRICS_RECORD: record}), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _large_strategy(name: str, model: nn.Module, num_nodes: int, privacy: bool = True) -> Any:
    from fedqsn_flwr.flower.strategies import FedQSN, MeasuredFedAvg

    common: dict[str, Any] = {
        "fraction_evaluate": 0.0,
        "min_train_nodes": num_nodes,
        "min_available_nodes": num_nodes,
    }
    if name == "fedavg":
        return MeasuredFedAvg(seed=0, **common)
    return FedQSN(
        policy_for_model(model),
        server_mask_ratio=P1,
        client_mask_ratio=P2,
        bit_width=BIT_WIDTH,
        block_size=BLOCK_SIZE,
        seed=0,
        server_secret=BENCH_SECRET,
        privacy_metrics=privacy,  # on: the app's setting (the library's default is off)
        **common,
    )


def _fake_replies(messages: list[Message], state: Mapping[str, torch.Tensor]) -> list[Message]:
    """Replies a client would send (a small update of what it received)."""
    replies = []
    metrics = MetricRecord({"num-examples": 100, "train-loss": 0.5})
    for message in messages:
        if PROXY_RECORD in message.content.array_records:
            proxy = decode_proxy(message.content[PROXY_RECORD], message.content[LAYOUT_RECORD])
            trained = {k: v + 1e-3 if v.is_floating_point() else v for k, v in proxy.state.items()}
            content = RecordDict({"update": encode_update(trained, proxy), METRICS_RECORD: metrics})
        else:
            content = RecordDict({"arrays": ArrayRecord(dict(state)), METRICS_RECORD: metrics})
        reply = Message(content, reply_to=_with_id(message))
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        replies.append(reply)
    return replies


def _with_id(message: Message) -> Message:
    if not message.metadata.message_id:
        message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _server_seconds(name: str, model: nn.Module, num_nodes: int, privacy: bool = True) -> float:
    """One training round of strategy ``name``: configure_train + aggregate_train per client."""
    state = model.state_dict()
    strategy = _large_strategy(name, model, num_nodes, privacy)
    grid = _NodeGrid(num_nodes)
    arrays = ArrayRecord(dict(state))
    messages = list(strategy.configure_train(1, arrays, _train_config(), grid))
    replies = _fake_replies(messages, state)
    del messages
    _release_memory()
    strategy.aggregate_train(1, replies)
    log = strategy.round_log[1]
    del replies, strategy
    _release_memory()
    return (log["configure_train_seconds"] + log["aggregate_train_seconds"]) / num_nodes


def large_server_cases(num_nodes: int = 20, repeats: int = 2) -> list[Case]:
    """Server seconds per client for the ~100 M model (synthetic client replies).

    FedAvg's round runs once (it takes minutes); FedQSN's ``repeats`` times, each
    after timing a proxy build of the same model, and the best of each is kept:
    the build is the floor of FedQSN's work per client (it builds one proxy per
    client), and the second row is the server's time per client against it.
    """
    torch.manual_seed(0)
    model = BertBaseLike()
    policy = policy_for_model(model)
    state = model.state_dict()
    visible = _client_mask(policy)
    cpu = torch.device("cpu")
    seconds = {
        "fedavg": _server_seconds("fedavg", model, num_nodes),
        "fedqsn": math.inf,
        "quiet": math.inf,
    }
    build = math.inf
    for _ in range(repeats):
        times = _best_times(
            {
                "build": lambda: encode_proxy(
                    state, policy, visible, bit_width=BIT_WIDTH, block_size=BLOCK_SIZE
                )
            },
            1,
            cpu,
        )
        build = min(build, times["build"])
        seconds["fedqsn"] = min(seconds["fedqsn"], _server_seconds("fedqsn", model, num_nodes))
        quiet = _server_seconds("fedqsn", model, num_nodes, privacy=False)
        seconds["quiet"] = min(seconds["quiet"], quiet)
    detail = f"{num_nodes} clients, configure_train + aggregate_train, with privacy metrics"
    dev = _device_name(cpu)
    return [
        _case(
            "server_seconds_per_client_no_privacy_metrics_vs_proxy_build_bert-base-like",
            seconds["quiet"],
            build,
            "<= 2",
            dev,
            "seconds per client",
            f"as below, privacy_metrics=False (the library's default), best of {repeats}",
        ),
        _case(
            "server_seconds_per_client_vs_fedavg_bert-base-like",
            seconds["fedqsn"],
            seconds["fedavg"],
            "report",
            dev,
            "seconds per client",
            f"{detail}; FedQSN best of {repeats} rounds, FedAvg one round",
        ),
        _case(
            "server_seconds_per_client_vs_proxy_build_bert-base-like",
            seconds["fedqsn"],
            build,
            "<= 2",
            dev,
            "seconds per client",
            f"{detail}, best of {repeats} rounds; baseline: building one client's proxy "
            f"(encode_proxy, p1=p2={P1}, NF{BIT_WIDTH}, block {BLOCK_SIZE}), best of "
            f"{repeats}, timed before each round",
        ),
    ]


def hf_models() -> dict[str, nn.Module]:
    """A RoBERTa-base- and a GPT-2-sized Hugging Face model (default configs, random weights)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    from fedqsn_flwr.app.huggingface import HuggingFaceModel

    torch.manual_seed(0)
    roberta = RobertaForSequenceClassification(RobertaConfig(num_labels=2))
    gpt2 = GPT2LMHeadModel(GPT2Config())
    return {
        "roberta-base-like": HuggingFaceModel(roberta, 1, "classification"),
        # the tied output head travels once, as the token embedding
        "gpt2-like": HuggingFaceModel(gpt2, 50256, "causal-lm"),
    }


def hf_cases(repeats: int = 2, num_nodes: int = 10) -> list[Case]:
    """Proxy build, client decode and server seconds per client, against FedAvg, per model.

    FedAvg's counterparts measured in the same run: building its message (the
    model as Flower arrays), a client loading it (arrays to tensors, then
    ``load_state_dict``), and its server round (``configure_train`` +
    ``aggregate_train``, synthetic replies).
    """
    cases: list[Case] = []
    for label, model in hf_models().items():
        cases += _hf_model_cases(label, model, repeats, num_nodes)
        del model
        _release_memory()
    return cases


def _decode_times(
    model: nn.Module, policy: MaskPolicy, visible: Mapping[str, torch.Tensor], repeats: int
) -> dict[str, float]:
    """A client's decode of a proxy into its model vs loading FedAvg's arrays."""
    state = model.state_dict()
    arrays, layout, _ = encode_proxy(
        state, policy, dict(visible), bit_width=BIT_WIDTH, block_size=BLOCK_SIZE
    )
    plain = ArrayRecord(dict(state))
    client = {k: v.clone() for k, v in state.items()}  # the client's model, touched
    return _best_times(
        {
            "proxy": lambda: decode_proxy(arrays, layout, into=client),
            "fedavg": lambda: model.load_state_dict(plain.to_torch_state_dict()),
        },
        repeats,
        torch.device("cpu"),
    )


def _hf_model_cases(label: str, model: nn.Module, repeats: int, num_nodes: int) -> list[Case]:
    cpu = torch.device("cpu")
    dev = _device_name(cpu)
    state = model.state_dict()
    policy = policy_for_model(model)
    visible = _client_mask(policy)
    numel = sum(t.numel() for t in state.values())
    what = f"{numel:,} parameters, p1=p2={P1}, NF{BIT_WIDTH}, block {BLOCK_SIZE}"
    build = _best_times(
        {
            "proxy": lambda: encode_proxy(
                state, policy, visible, bit_width=BIT_WIDTH, block_size=BLOCK_SIZE
            ),
            "fedavg": lambda: ArrayRecord(dict(state)),
        },
        repeats,
        cpu,
    )
    decode = _decode_times(model, policy, visible, repeats)
    _release_memory()
    server = {
        "fedavg": _server_seconds("fedavg", model, num_nodes),
        "fedqsn": min(_server_seconds("fedqsn", model, num_nodes) for _ in range(repeats)),
        "quiet": min(
            _server_seconds("fedqsn", model, num_nodes, privacy=False) for _ in range(repeats)
        ),
    }
    return [
        _case(
            f"server_seconds_per_client_no_privacy_metrics_vs_proxy_build_{label}",
            server["quiet"],
            build["proxy"],
            "<= 2",
            dev,
            "seconds per client",
            f"{num_nodes} clients, privacy_metrics=False (the library's default); baseline: "
            "building one client's proxy, same run",
        ),
        _case(
            f"proxy_build_vs_fedavg_message_{label}",
            build["proxy"],
            build["fedavg"],
            "report",
            dev,
            "seconds",
            f"one client's proxy (encode_proxy) vs FedAvg's message arrays; {what}",
        ),
        _case(
            f"client_decode_vs_fedavg_load_{label}",
            decode["proxy"],
            decode["fedavg"],
            "report",
            dev,
            "seconds",
            f"decode_proxy into the client's tensors vs FedAvg's arrays loaded; {what}",
        ),
        _case(
            f"server_seconds_per_client_vs_fedavg_{label}",
            server["fedqsn"],
            server["fedavg"],
            "report",
            dev,
            "seconds per client",
            f"{num_nodes} clients, configure_train + aggregate_train, with privacy metrics; "
            f"FedQSN best of {repeats} rounds, FedAvg one round",
        ),
        _case(
            f"server_seconds_per_client_vs_proxy_build_{label}",
            server["fedqsn"],
            build["proxy"],
            "<= 2",
            dev,
            "seconds per client",
            f"{num_nodes} clients; baseline: building one client's proxy, same run",
        ),
    ]


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def memory_probe(num_nodes: int = 20) -> dict[str, float]:
    """In this (fresh) process: peak RSS added by configure_train for ``num_nodes`` clients."""
    torch.manual_seed(0)
    model = BertBaseLike()
    strategy = _large_strategy("fedqsn", model, num_nodes)
    arrays = ArrayRecord(model.state_dict())
    del model
    gc.collect()
    before = _rss()
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    messages = list(strategy.configure_train(1, arrays, _train_config(), _NodeGrid(num_nodes)))
    stop.set()
    sampler.join()
    # Not ru_maxrss: a child process inherits its parent's high-water mark.
    peak = max(peak, _rss())
    total = sum(message_bytes(m) for m in messages)
    return {
        "extra_peak_bytes": float(peak - before),
        "message_bytes": float(total),
        "model_bytes": float(sum(a.numpy().nbytes for a in arrays.values())),
    }


def memory_cases(num_nodes: int = 20) -> list[Case]:
    """Run :func:`memory_probe` in a fresh process (peak RSS cannot be reset)."""
    output = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(num_nodes)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    probe = json.loads(output.strip().splitlines()[-1])
    mib = 2**20
    beyond = (probe["extra_peak_bytes"] - probe["message_bytes"]) / mib
    return [
        _case(
            f"peak_memory_{num_nodes}_proxies_beyond_messages_vs_model_bert-base-like",
            beyond,
            probe["model_bytes"] / mib,
            "<= 4",
            _device_name(torch.device("cpu")),
            "MiB",
            f"extra peak RSS of configure_train for {num_nodes} clients (privacy metrics on) "
            f"minus the {probe['message_bytes'] / mib:.0f} MiB of serialized messages Flower "
            f"must hold, vs the float32 model; {num_nodes} decoded proxies would be "
            f"{num_nodes}x",
        )
    ]


def scale_cases(num_nodes: int, rounds: int = 3, sampled: int = 20) -> list[Case]:
    """A Flower simulation with ``num_nodes`` virtual SuperNodes vs one with 10."""
    import tempfile

    from fedqsn_flwr.experiments.simulation import simulate

    cases = []
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in (10, num_nodes):
            fraction = min(1.0, sampled / nodes)
            overrides = {
                "num-server-rounds": rounds,
                "fraction-train": fraction,
                "fraction-evaluate": fraction,
                "min-nodes": min(nodes, 2),
                "save-messages": False,
                "output-dir": tmp,
                "run-name": f"scale-{nodes}",
            }
            measured[nodes] = _measure_process_tree(
                lambda overrides=overrides, nodes=nodes: simulate(overrides, num_nodes=nodes)
            )
    dev = _device_name(torch.device("cpu"))
    detail = (
        f"default config, {rounds} rounds, about {sampled} nodes sampled per round; "
        f"baseline: the same with 10 nodes"
    )
    wall, peak = measured[num_nodes]
    wall10, peak10 = measured[10]
    cases.append(
        _case(f"scale_wall_seconds_{num_nodes}_nodes", wall, wall10, "report", dev, "s", detail)
    )
    cases.append(
        _case(
            f"scale_peak_memory_{num_nodes}_nodes",
            peak / 2**20,
            peak10 / 2**20,
            "report",
            dev,
            "MiB",
            detail + " (RSS of the process tree, sampled every 0.2 s)",
        )
    )
    return cases


def _measure_process_tree(run: Callable[[], object]) -> tuple[float, float]:
    import psutil

    me = psutil.Process()
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            peak = max(peak, total)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        run()
    finally:
        stop.set()
        sampler.join()
    return time.perf_counter() - started, float(peak)


def _print(cases: list[Case]) -> None:
    print(f"{'case':<58} {'value':>12} {'baseline':>12} {'ratio':>8}  target   met")
    for c in cases:
        met = {True: "yes", False: "NO", None: "-"}[c.met()]
        print(
            f"{c.case:<58} {c.value:>12.4g} {c.baseline:>12.4g} {c.ratio:>8.3f}  "
            f"{c.target:<8} {met}"
        )
    if cases:
        print(f"device: {cases[0].device if cases[0].device != '-' else cases[-1].device}")


def run(args: argparse.Namespace) -> list[Case]:
    """All cases the arguments ask for."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedqsn_flwr.app.models import build_model

    # Messages need a task identity outside a ServerApp process.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    if args.scale:
        return scale_cases(args.nodes)
    if args.only == "large-server":
        return large_server_cases(repeats=max(2, args.repeats // 2))
    if args.only == "hf":
        return hf_cases(repeats=max(2, args.repeats // 2))
    device = torch.device(args.device if args.device != "auto" else _auto())
    cases: list[Case] = []
    torch.manual_seed(0)
    tensor = torch.randn(4096, 4096)
    single = {"weight": tensor}
    cases += speed_cases(
        "4096x4096", single, _tensor_policy("weight", tensor), args.repeats, device
    )
    if args.only == "speed":
        torch.manual_seed(0)
        large = BertBaseLike()
        state, policy = large.state_dict(), policy_for_model(large)
        return cases + speed_cases(
            "bert-base-like", state, policy, max(2, args.repeats // 2), device
        )
    cnn = build_model("cnn", 0.2, seed=0)
    cases += byte_cases("digits-cnn", cnn.state_dict(), policy_for_model(cnn))
    if not args.skip_large:
        torch.manual_seed(0)
        large = BertBaseLike()
        state, policy = large.state_dict(), policy_for_model(large)
        cases += speed_cases("bert-base-like", state, policy, max(2, args.repeats // 2), device)
        cases += byte_cases("bert-base-like", state, policy)
        del large, state
        gc.collect()
    cases += round_cases(args.rounds)
    if not args.skip_large:
        cases += large_server_cases(repeats=max(2, args.repeats // 2))
        cases += hf_cases(repeats=max(2, args.repeats // 2))
        cases += memory_cases()
    return cases


def _auto() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the cases to this JSON file")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (best kept)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of the round case")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--skip-large", action="store_true", help="skip the ~100 M model")
    parser.add_argument("--scale", action="store_true", help="run the many-nodes simulation")
    parser.add_argument(
        "--only",
        choices=["large-server", "hf", "speed"],
        help="run one group of cases: large-server = the ~100 M model's server seconds per "
        "client vs FedAvg and vs a proxy build (~5 min); hf = RoBERTa-base- and GPT-2-sized "
        "Hugging Face models: proxy build, client decode, server seconds per client; speed = "
        "proxy build and client unpack vs bitsandbytes on 4096x4096 and the ~100 M model",
    )
    parser.add_argument("--nodes", type=int, default=1000, help="virtual SuperNodes (--scale)")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        print(json.dumps(memory_probe(args.memory_probe)))
        return 0
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cases = run(args)
    _print(cases)
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cases], indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
