"""The server side of a run: starting model, strategy, evaluation, outputs."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle
import random
from collections.abc import Mapping
from dataclasses import replace
from importlib.metadata import version as _version
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import nn

from fedqsn_flwr.app.base import CAUSAL_LM, is_hf
from fedqsn_flwr.app.config import ConfigError, output_root
from fedqsn_flwr.app.huggingface import hf_folder
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.private import private_dir, save_private
from fedqsn_flwr.app.results import RunRecorder
from fedqsn_flwr.app.splits import ServerData, partition_rows, server_data
from fedqsn_flwr.app.training import (
    evaluate_state,
    loss_gradient,
    perplexity,
    pick_device,
    train,
)
from fedqsn_flwr.core.feedback import GradientFn, LossFn
from fedqsn_flwr.core.masking import format_description, policy_for_model
from fedqsn_flwr.core.secret import (
    SecretError,
    explicit_secret,
    new_secret,
    resolve_secret,
    secret_rng,
    secret_torch_generator,
    store_secret,
    torch_rng_from_secret,
)
from fedqsn_flwr.flower.protocol import PARTITION_ROWS_KEY
from fedqsn_flwr.flower.strategies import (
    FedQSN,
    MeasuredFedAvg,
    MessageSink,
    NodeConfigFn,
    StateEvaluateFn,
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


def initial_model(
    config: Mapping[str, Any], data: ServerData, secret: bytes, pretrain: bool = True
) -> nn.Module:
    """The server's starting model: secret-seeded init or ``initial-model``, then pretraining.

    Initialisation and the pretraining order derive from the server ``secret``,
    so no client can redo the server's pretraining from the run config. With
    ``pretrain`` False (a resumed run, whose weights come from its checkpoint)
    only the architecture is built.
    """
    model = build_model(
        config["model"],
        config["dropout"],
        spec=data.spec,
        pretrained=config["hf-weights"],
        secret=secret,
    )
    if config.get("initial-model"):
        load_initial_weights(model, config["initial-model"])
    model.to(pick_device(config["device"]))
    if not pretrain:
        return model
    cache = pretrained_path(config, secret)
    if config["pretrain-epochs"] > 0 and len(data.pretrain) > 0 and cache is not None:
        if cache.exists():
            state = torch.load(cache, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            log(INFO, "Pretrained starting model taken from the cache %s", cache)
            return model
    if config["pretrain-epochs"] > 0 and len(data.pretrain) > 0:
        # dropout from the global generator, the batch order from its own: both
        # filled in full from the secret
        with torch_rng_from_secret(secret, "pretrain-dropout"):
            loss = train(
                model,
                data.pretrain,
                epochs=config["pretrain-epochs"],
                learning_rate=config["learning-rate"],
                batch_size=config["batch-size"],
                seed=secret_torch_generator(secret, "pretrain-order"),
                optimizer=config["optimizer"],
            )
        log(
            INFO,
            "Pretrained the starting model on %d private examples (loss %.4f)",
            len(data.pretrain),
            loss,
        )
        if cache is not None:
            private_dir(cache.parent)
            save_private({k: v.cpu() for k, v in model.state_dict().items()}, cache)
    return model


#: Config keys that decide the pretrained starting model (with the secret).
_PRETRAIN_KEYS = (
    "dataset",
    "data-dir",
    "vocab-size",
    "max-length",
    "mnist1d-server-examples",
    "mnist1d-test-examples",
    "mnist1d-client-shear",
    "model",
    "dropout",
    "hf-weights",
    "initial-model",
    "pretrain-epochs",
    "pretrain-fraction",
    "test-fraction",
    "learning-rate",
    "batch-size",
    "optimizer",
    "seed",
    "device",
)


def pretrained_path(config: Mapping[str, Any], secret: bytes) -> Path | None:
    """Where ``pretrain-cache`` keeps this run's pretrained model (None: off).

    Named by a hash of the secret and everything that decides the pretrained
    weights (and the library and torch versions), so runs of a comparison that
    share a seed's secret pretrain once; the folder is the server's own
    (``<output-dir>/.pretrained``, mode 0700).
    """
    if not config["pretrain-cache"] or config.get("initial-model"):
        return None
    checkpoint: list[tuple[str, int, int]] = []
    if is_hf(config["model"]):
        # the folder's files decide the starting weights too: a replaced checkpoint
        # must not reuse a model pretrained from the old one
        folder = hf_folder(config["model"])
        checkpoint = [
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(folder.iterdir())
            if f.is_file()
        ]
    described = json.dumps(
        {
            "keys": {k: config[k] for k in _PRETRAIN_KEYS},
            "checkpoint": checkpoint,
            "fedqsn-flwr": _version("fedqsn-flwr"),
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(secret + described.encode()).hexdigest()[:32]
    return output_root(config) / ".pretrained" / f"{digest}.pt"


def feedback_fns(
    config: Mapping[str, Any], model: nn.Module, data: ServerData, secret: bytes
) -> tuple[GradientFn, LossFn]:
    """Hidden-unit feedback's two uses of the server's pretraining data.

    The mean loss gradient on ``feedback-examples`` of its rows, and the mean
    loss on as many *other* rows (held out from the gradient: a step is kept only
    if it does not raise their loss). Both samples are drawn from the secret;
    with fewer than twice ``feedback-examples`` rows, each takes half.
    """
    if len(data.pretrain) < 2:
        raise ConfigError(
            "config key 'hidden-feedback' needs data of the server's own, and this run has "
            f"{len(data.pretrain)} pretraining rows (at least 2: one for the gradient, one "
            "held out; pretrain-fraction = 0 or a partition loader without server data?)"
        )
    count = min(config["feedback-examples"], len(data.pretrain) // 2)
    rows = secret_rng(secret, "feedback").permutation(len(data.pretrain))
    sample = data.pretrain.subset(np.sort(rows[:count]))
    held_out = data.pretrain.subset(np.sort(rows[count : 2 * count]))
    scratch = copy.deepcopy(model)

    def gradient(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return loss_gradient(scratch, state, sample)

    def loss(state: Mapping[str, torch.Tensor]) -> float:
        return evaluate_state(scratch, state, held_out)[0]

    return gradient, loss


def partition_config(config: Mapping[str, Any], data: ServerData, secret: bytes) -> NodeConfigFn:
    """The config items that tell each client which rows of the data set it holds.

    Partitions are cut once per number of partitions (as the nodes report it);
    a partition id out of range gets nothing (its client refuses to train).
    """
    cuts: dict[int, list[np.ndarray]] = {}

    def rows(partition_id: int, num_partitions: int) -> dict[str, list[int]]:
        if not 0 <= partition_id < num_partitions:
            return {}
        if num_partitions not in cuts:
            cuts[num_partitions] = partition_rows(
                data,
                secret=secret,
                seed=config["seed"],
                num_partitions=num_partitions,
                partitioning=config["partitioning"],
                alpha=config["dirichlet-alpha"],
            )
        return {PARTITION_ROWS_KEY: cuts[num_partitions][partition_id].tolist()}

    return rows


def build_strategy(
    config: Mapping[str, Any],
    model: nn.Module,
    proxy_evaluate_fn: StateEvaluateFn | None,
    message_sink: MessageSink | None = None,
    server_secret: bytes | None = None,
    feedback: tuple[GradientFn, LossFn] | None = None,
) -> MeasuredFedAvg:
    """The strategy named by ``config['strategy']``.

    ``fedqsn``: masks and quantization; ``fedsn``: masks, float32 proxies;
    ``fedq``: the whole model quantized, no masks (FedLPP-style, without LoRA);
    ``fedavg``: Flower's FedAvg; ``fedprox``: FedAvg on the server, FedProx's
    proximal term (``proximal-mu``) in client training. ``server_secret`` keys
    the masks and the server's rows; without it, the secret comes from
    ``FEDQSN_SERVER_SECRET`` or ``server-secret-file`` as in the ServerApp
    (:func:`~fedqsn_flwr.core.secret.explicit_secret`), else fresh random bytes.
    On a data set split into the server's and the clients' rows every message
    tells its client which rows it holds (:func:`partition_config`).
    ``feedback`` (:func:`feedback_fns`) is needed with ``hidden-feedback``.
    """
    common: dict[str, Any] = {
        "fraction_train": config["fraction-train"],
        "fraction_evaluate": config["fraction-evaluate"],
        "min_train_nodes": config["min-nodes"],
        "min_evaluate_nodes": config["min-nodes"] if config["fraction-evaluate"] > 0 else 0,
        "min_available_nodes": config["min-nodes"],
        "proxy_evaluate_fn": proxy_evaluate_fn,
        "message_sink": message_sink,
        "max_num_examples": config["max-num-examples"],
        "max_update_norm_ratio": config["max-update-norm-ratio"] or math.inf,
        "partition_query": True,  # this project's ClientApp answers it
    }
    if config["hidden-feedback"] and config["strategy"] not in ("fedsn", "fedqsn"):
        raise ConfigError(
            "config key 'hidden-feedback' needs a server mask: strategy fedsn or fedqsn, "
            f"not {config['strategy']}"
        )
    if server_secret is None:
        try:
            given = explicit_secret(config)
        except SecretError as err:
            raise ConfigError(str(err)) from err
        server_secret = given[0] if given is not None else new_secret()
    data = server_data(config, server_secret)
    if data.pool_rows is not None:
        common["node_config_fn"] = partition_config(config, data, server_secret)
    if config["strategy"] in ("fedavg", "fedprox"):
        return MeasuredFedAvg(seed=config["seed"], **common)
    policy = policy_for_model(
        model,
        mask_input_layer=config["mask-input-layer"],
        shared_residual_mask=config["shared-residual-mask"],
    )
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
        update_bit_width=config["update-bit-width"],
        device=pick_device(config["device"]),
        privacy_metrics=True,
        server_secret=server_secret,
        hidden_feedback=config["hidden-feedback"],
        feedback_gradient_fn=feedback[0] if feedback else None,
        feedback_loss_fn=feedback[1] if feedback else None,
        feedback_step=config["feedback-step"],
        feedback_tolerance=config["feedback-tolerance"],
        proxy_evaluations=config["proxy-evaluations"],
        **common,
    )


def train_config(config: Mapping[str, Any]) -> ConfigRecord:
    """What every training message tells the client."""
    record = ConfigRecord(
        {
            "local-epochs": config["local-epochs"],
            "learning-rate": config["learning-rate"],
            "batch-size": config["batch-size"],
            "optimizer": config["optimizer"],
        }
    )
    if config["strategy"] == "fedprox":
        record["proximal-mu"] = config["proximal-mu"]
    if config["hidden-feedback"]:
        record["hidden-feedback"] = True
    return record


def run_server(grid: Grid, config: Mapping[str, Any]) -> RunRecorder:
    """Run one federation with a validated ``config``; return its recorder."""
    random.seed(config["seed"])
    recorder = RunRecorder(config)
    log(INFO, "Writing results to %s", recorder.directory)
    try:
        secret, source = resolve_secret(config, recorder.directory, recorder.checkpoint is not None)
    except SecretError as err:
        raise ConfigError(str(err)) from err
    store_secret(recorder.directory, secret)
    log(INFO, "Server secret: from %s (kept in the run folder only)", source)
    data = server_data(config, secret)
    # a resumed run takes its weights from the checkpoint: no second pretraining
    model = initial_model(config, data, secret, pretrain=recorder.checkpoint is None)

    language_model = data.spec.task == CAUSAL_LM

    def scores(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        loss, accuracy = evaluate_state(model, state, data.test)
        return {"accuracy": accuracy, "loss": loss}

    sink = recorder.save_received if config["save-messages"] else None
    feedback = None
    if config["hidden-feedback"] and config["strategy"] in ("fedsn", "fedqsn"):
        feedback = feedback_fns(config, model, data, secret)
    strategy = build_strategy(config, model, scores, sink, secret, feedback)
    if isinstance(strategy, FedQSN):
        described = strategy.policy.describe(model.state_dict())
        log(INFO, "What travels how (the mask policy):\n%s", format_description(described))
    initial = ArrayRecord(model.state_dict())
    if recorder.checkpoint is not None:
        checkpoint = recorder.checkpoint
        initial = ArrayRecord(checkpoint["global"])
        strategy.restore(checkpoint["strategy"], checkpoint["global"])
        log(INFO, "Resuming from %s after round %d", recorder.checkpoint_path, checkpoint["round"])

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        global_scores = scores(arrays.to_torch_state_dict())
        server_scores = global_scores
        if isinstance(strategy, FedQSN):
            server_scores = scores(strategy.server_model(arrays))
        values = {
            **strategy.round_log.get(server_round, {}),
            "round": server_round,
            **{f"global_{k}": v for k, v in global_scores.items()},
            **{f"server_{k}": v for k, v in server_scores.items()},
        }
        if language_model:
            # exp of the mean loss (the proxies': over the round's clients), as the attacks
            for who in ("global", "server", "proxy"):
                values[f"{who}_perplexity"] = perplexity(values.get(f"{who}_loss", math.nan))
        row = recorder.add_round(values)
        recorder.save_checkpoint(
            server_round, arrays.to_torch_state_dict(), strategy.checkpoint_state()
        )
        score = "perplexity" if language_model else "accuracy"
        log(
            INFO,
            "%s seed %d round %d/%d: %s global %.4f | server %.4f | proxy %.4f"
            " | down %.0f B | up %.0f B",
            config["strategy"],
            config["seed"],
            server_round,
            config["num-server-rounds"],
            score,
            row[f"global_{score}"],
            row[f"server_{score}"],
            row[f"proxy_{score}"],
            row["bytes_down"],
            row["bytes_up"],
        )
        return MetricRecord(
            {f"global-{score}": row[f"global_{score}"], f"server-{score}": row[f"server_{score}"]}
        )

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=config["num-server-rounds"],
        timeout=config["round-timeout"],
        train_config=train_config(config),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate,
    )
    final = result.arrays if len(result.arrays) else initial
    recorder.save_model(final.to_torch_state_dict())
    recorder.write_messages(strategy.message_log)
    recorder.write_federation(
        strategy.nodes.num_partitions, sorted(set(strategy.nodes.partition_ids.values()))
    )
    print(
        f"\nfedqsn-flwr: {config['strategy']} finished {config['num-server-rounds']} rounds "
        f"(seed {config['seed']})\n{recorder.summary_table()}\n"
        f"Results written to {recorder.directory}",
        flush=True,
    )
    return recorder
