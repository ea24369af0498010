"""The server side of a run: starting model, strategy, evaluation, outputs."""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Mapping
from dataclasses import replace
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import nn

from .config import ConfigError
from .data import ServerData, load_server_data
from .datasets import data_key
from .masking import policy_for_model
from .models import build_model
from .results import RunRecorder
from .strategy import FedQSN, MeasuredFedAvg, MessageSink, StateEvaluateFn
from .training import evaluate_state, pick_device, train


def server_data(config: Mapping[str, Any]) -> ServerData:
    """The server's test set, private pretraining set and client pool."""
    return load_server_data(
        data_key(config), config["seed"], config["test-fraction"], config["pretrain-fraction"]
    )


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Load the server's own weights (a ``torch.save``d state dict) into ``model``."""
    file = Path(path).expanduser()
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise ConfigError(f"config key 'initial-model': cannot load '{file}': {err}") from err
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise ConfigError(f"config key 'initial-model': '{file}' does not hold a state dict")
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as err:
        raise ConfigError(
            f"config key 'initial-model': '{file}' does not fit model '{type(model).__name__}': "
            f"{str(err).splitlines()[0]} ..."
        ) from err
    log(INFO, "Loaded the server's initial weights from %s", file)


def initial_model(config: Mapping[str, Any], data: ServerData) -> nn.Module:
    """The server's starting model: seeded init or ``initial-model``, then pretraining."""
    model = build_model(config["model"], config["dropout"], seed=config["seed"], spec=data.spec)
    if config.get("initial-model"):
        load_initial_weights(model, config["initial-model"])
    model.to(pick_device(config["device"]))
    if config["pretrain-epochs"] > 0 and len(data.pretrain) > 0:
        loss = train(
            model,
            data.pretrain,
            epochs=config["pretrain-epochs"],
            learning_rate=config["learning-rate"],
            batch_size=config["batch-size"],
            seed=config["seed"],
        )
        log(
            INFO,
            "Pretrained the starting model on %d private examples (loss %.4f)",
            len(data.pretrain),
            loss,
        )
    return model


def build_strategy(
    config: Mapping[str, Any],
    model: nn.Module,
    proxy_evaluate_fn: StateEvaluateFn | None,
    message_sink: MessageSink | None = None,
) -> MeasuredFedAvg:
    """The strategy named by ``config['strategy']``.

    ``fedqsn``: masks and quantization; ``fedsn``: masks, float32 proxies;
    ``fedq``: the whole model quantized, no masks (FedLPP-style, without LoRA);
    ``fedavg``: Flower's FedAvg; ``fedprox``: FedAvg on the server, FedProx's
    proximal term (``proximal-mu``) in client training.
    """
    common: dict[str, Any] = {
        "fraction_train": config["fraction-train"],
        "fraction_evaluate": config["fraction-evaluate"],
        "min_train_nodes": config["min-nodes"],
        "min_evaluate_nodes": config["min-nodes"] if config["fraction-evaluate"] > 0 else 0,
        "min_available_nodes": config["min-nodes"],
        "proxy_evaluate_fn": proxy_evaluate_fn,
        "message_sink": message_sink,
    }
    if config["strategy"] in ("fedavg", "fedprox"):
        return MeasuredFedAvg(seed=config["seed"], **common)
    policy = policy_for_model(model, mask_input_layer=config["mask-input-layer"])
    masked = config["strategy"] in ("fedqsn", "fedsn")
    if not masked:
        policy = replace(policy, unit_axes={}, unit_counts={})
    return FedQSN(
        policy=policy,
        server_mask_ratio=config["server-mask-ratio"] if masked else 0.0,
        client_mask_ratio=config["client-mask-ratio"] if masked else 0.0,
        bit_width=config["bit-width"] if config["strategy"] in ("fedqsn", "fedq") else None,
        block_size=config["block-size"],
        seed=config["seed"],
        max_num_examples=config["max-num-examples"],
        max_update_norm_ratio=config["max-update-norm-ratio"] or math.inf,
        update_bit_width=config["update-bit-width"],
        device=pick_device(config["device"]),
        **common,
    )


def train_config(config: Mapping[str, Any]) -> ConfigRecord:
    """What every training message tells the client."""
    record = ConfigRecord(
        {
            "local-epochs": config["local-epochs"],
            "learning-rate": config["learning-rate"],
            "batch-size": config["batch-size"],
        }
    )
    if config["strategy"] == "fedprox":
        record["proximal-mu"] = config["proximal-mu"]
    return record


def run_server(grid: Grid, config: Mapping[str, Any]) -> RunRecorder:
    """Run one federation with a validated ``config``; return its recorder."""
    random.seed(config["seed"])
    data = server_data(config)
    model = initial_model(config, data)
    recorder = RunRecorder(config)
    log(INFO, "Writing results to %s", recorder.directory)

    def proxy_accuracy(state: Mapping[str, torch.Tensor]) -> float:
        return evaluate_state(model, state, data.test)[1]

    sink = recorder.save_received if config["save-messages"] else None
    strategy = build_strategy(config, model, proxy_accuracy, sink)
    initial = ArrayRecord(model.state_dict())
    first_round = 1
    if recorder.checkpoint is not None:
        checkpoint = recorder.checkpoint
        initial = ArrayRecord(checkpoint["global"])
        strategy.restore(checkpoint["strategy"], checkpoint["global"])
        first_round = int(checkpoint["round"]) + 1
        log(INFO, "Resuming from %s after round %d", recorder.checkpoint_path, first_round - 1)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        global_loss, global_accuracy = evaluate_state(
            model, arrays.to_torch_state_dict(), data.test
        )
        server_accuracy = global_accuracy
        if isinstance(strategy, FedQSN):
            server_accuracy = evaluate_state(model, strategy.server_model(arrays), data.test)[1]
        row = recorder.add_round(
            {
                **strategy.round_log.get(server_round, {}),
                "round": server_round,
                "global_accuracy": global_accuracy,
                "global_loss": global_loss,
                "server_accuracy": server_accuracy,
            }
        )
        recorder.save_checkpoint(
            server_round, arrays.to_torch_state_dict(), strategy.checkpoint_state()
        )
        log(
            INFO,
            "%s seed %d round %d/%d: global %.4f | server %.4f | proxy %.4f"
            " | down %.0f B | up %.0f B",
            config["strategy"],
            config["seed"],
            server_round,
            config["num-server-rounds"],
            row["global_accuracy"],
            row["server_accuracy"],
            row["proxy_accuracy"],
            row["bytes_down"],
            row["bytes_up"],
        )
        return MetricRecord(
            {"global-accuracy": global_accuracy, "server-accuracy": server_accuracy}
        )

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=config["num-server-rounds"],
        timeout=config["round-timeout"],
        train_config=train_config(config),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate,
        first_round=first_round,
    )
    final = result.arrays if len(result.arrays) else initial
    recorder.save_model(final.to_torch_state_dict())
    recorder.write_messages(strategy.message_log)
    recorder.write_federation(strategy.num_partitions, sorted(set(strategy.partition_ids.values())))
    print(
        f"\nfedqsn-flwr: {config['strategy']} finished {config['num-server-rounds']} rounds "
        f"(seed {config['seed']})\n{recorder.summary_table()}\n"
        f"Results written to {recorder.directory}",
        flush=True,
    )
    return recorder
