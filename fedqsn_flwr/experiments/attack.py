"""Attacks on model privacy, run on a finished run's folder.

    python -m fedqsn_flwr.experiments.attack --run ~/fedqsn-outputs/<run-name>

Everything an attacker uses is read from ``<run>/received/``: the training
messages exactly as clients received them, plus the clients' own data and what
the run config tells every client. The scorer reads the server's test set (it
needs the run folder's server secret for that; the attackers never do). Threat
models -- all evaluated on the server's test set, and every fine-tuning attack
reports its best epoch *on that test set*, so each accuracy is an upper bound on
what the attackers could reach and know they reached:

* ``proxy_as_is`` -- an honest-but-curious client keeps the last proxy it got
  and uses it as a model (best client reported);
* ``finetune`` -- a client fine-tunes its last proxy on its own training data,
  every parameter trainable, for ``epochs`` epochs at each learning rate of a
  small search; the best test accuracy over epochs and rates is reported (best
  of the first ``max_clients`` clients);
* ``collusion`` -- all clients pool every proxy of every round (training and
  evaluation messages) and rebuild the
  best model they can: for each unit, the latest value any of them saw (unit
  scaling undone); units never seen are 0. Evaluated as-is and after
  fine-tuning on their pooled data;
* ``public_fill`` -- as ``collusion``, but units never seen are filled from a
  *public initialisation* (the random init anyone can reproduce from the code
  and the run's public seed). The server's own init derives from its secret, so
  this no longer hands over its starting values; with ``initial-model`` set to
  a public checkpoint, an attacker who has that checkpoint could fill the
  hidden units from it: masking protects only weights the public does not have.

The *data-only* reference (not an attack on the model): the best of the run's
model and a small CNN for the data (``cnn`` for images, ``cnn1d`` for signals),
each from a public initialisation, trained on the colluding clients' pooled
data with the same budget (epochs and learning rates) as the attacks: what they
reach without any proxy. On MNIST-1D, whose server data comes from the
``mnist1d`` package's generator that anyone can run, a third candidate is the
run's model pretrained as the server pretrains it on that public generator
(``public-generator``, :func:`public_generator_model`), as is and fine-tuned on
the pooled data: the colluders' real best without a proxy. *Knowledge
leakage* = (best attack - data-only) / (global - data-only): 0 when the
proxies teach the attackers nothing beyond their data, 1 when they give the
model away. When the global model is at most :data:`NO_KNOWLEDGE_MARGIN`
above data-only there is no model knowledge to protect, and no ratio is
reported.

For a causal language model (E2E-style data) every figure is a token-level
*perplexity* on the server's test set, lower is better: the best attack is the
lowest, the privacy gap is best attack - global (positive: the attackers are
worse off than the server, as for accuracy), and knowledge leakage is computed
on token loss, the log of perplexity: (data-only loss - best attack loss) /
(data-only loss - global loss), with the same meaning (0: nothing beyond their
data, 1: the model given away) and the same margin, in nats.

Writes ``<run>/attacks.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import MessageType

from fedqsn_flwr.app.base import CAUSAL_LM, Split, is_hf
from fedqsn_flwr.app.huggingface import hf_folder
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.private import private_dir, save_private, write_private
from fedqsn_flwr.app.results import load_saved_messages, read_metrics
from fedqsn_flwr.app.server import partition_config
from fedqsn_flwr.app.sources import generate_mnist1d
from fedqsn_flwr.app.splits import client_data, server_data
from fedqsn_flwr.app.training import evaluate, evaluate_state, perplexity, train
from fedqsn_flwr.core.secret import SECRET_FILE, derive_seed
from fedqsn_flwr.flower.privacy import to_global_units
from fedqsn_flwr.flower.protocol import PARTITION_ROWS_KEY
from fedqsn_flwr.flower.proxy import Proxy, received_model

DEFAULT_EPOCHS = 10
#: Within a round the server sends train messages before evaluate ones.
_KIND_ORDER = {MessageType.TRAIN: 0, MessageType.EVALUATE: 1}
#: Fine-tuning learning rates the attacks search, per ``optimizer`` of the run.
DEFAULT_LEARNING_RATES = {"sgd": (0.005, 0.02, 0.05), "adamw": (1e-4, 5e-4, 2e-3)}
DEFAULT_MAX_CLIENTS = 3
#: Below this lead of the global model over data-only, leakage is not reported.
NO_KNOWLEDGE_MARGIN = 0.02
#: The small CNN the data-only reference also tries, per input kind.
SMALL_CNN = {"image": "cnn", "signal": "cnn1d"}
#: Part of every reference's cache key (:func:`cached`): bump it whenever the
#: recipe of a reference changes, so references cached by older code are not reused.
CACHE_VERSION = 2
#: The config keys that decide a reference beyond its data (in its cache key; a
#: key the run's config lacks counts as None).
REFERENCE_KEYS = (
    "model",
    "hf-weights",
    "dropout",
    "seed",
    "optimizer",
    "dataset",
    "max-length",
    "pretrain-epochs",
    "learning-rate",
    "batch-size",
    "mnist1d-server-examples",
)


@dataclass(frozen=True)
class Metric:
    """What the attacks are scored by: accuracy, or a language model's perplexity.

    Internally every figure is a *score*, higher is better: the accuracy, or
    minus the token loss; :meth:`value` turns it into what is reported.
    """

    name: str

    @classmethod
    def of(cls, spec: Any) -> Metric:
        """Perplexity for token targets, else accuracy."""
        return cls("perplexity" if spec.task == CAUSAL_LM else "accuracy")

    def score(self, loss: float, accuracy: float) -> float:
        """Higher is better: the accuracy, or minus the loss."""
        return accuracy if self.name == "accuracy" else -loss

    def value(self, score: float) -> float:
        """The reported figure of a score."""
        return score if self.name == "accuracy" else perplexity(-score)

    def gap(self, global_score: float, best_score: float) -> float:
        """Privacy gap, positive when the attackers are worse off than the server."""
        if self.name == "accuracy":
            return global_score - best_score
        return self.value(best_score) - self.value(global_score)

    def evaluate(self, model: torch.nn.Module, test: Split) -> float:
        """The score of ``model`` as it is."""
        return self.score(*evaluate(model, test))

    def evaluate_state(
        self, model: torch.nn.Module, state: Mapping[str, torch.Tensor], test: Split
    ) -> float:
        """The score of ``state`` loaded into ``model``."""
        return self.score(*evaluate_state(model, state, test))


ACCURACY = Metric("accuracy")


def knowledge_leakage(best_attack: float, data_only: float, global_accuracy: float) -> float | None:
    """(best attack - data-only) / (global - data-only); None with no knowledge to protect.

    Scores, higher is better (for a language model: minus the token loss).
    """
    if global_accuracy <= data_only + NO_KNOWLEDGE_MARGIN:
        return None
    return (best_attack - data_only) / (global_accuracy - data_only)


#: Label of the data-only candidate pretrained on MNIST-1D's public generator.
PUBLIC_GENERATOR = "public-generator"


def _weights(config: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face folder's weights are the attackers' public start.

    With ``hf-weights`` false the folder is an architecture: they start from a
    public initialisation instead.
    """
    return bool(config.get("hf-weights", True))


def data_only_reference(
    config: Mapping[str, Any],
    spec: Any,
    pooled: Split,
    test: Split,
    epochs: int,
    learning_rates: Sequence[float],
    metric: Metric = ACCURACY,
    *,
    patience: int | None = None,
    keep_state: bool = False,
) -> dict[str, Any]:
    """The attackers' best without any proxy (see the module docstring).

    Returns the best ``score`` and its reported value under ``metric.name``
    (with ``keep_state``, the best model's weights under ``"state"``).
    """
    architectures = [config["model"]]
    if (small := SMALL_CNN.get(spec.kind)) and small not in architectures:
        architectures.append(small)
    starts: list[tuple[str, str, dict[str, torch.Tensor]]] = []
    for name in architectures:
        model = build_model(
            name, config["dropout"], seed=config["seed"], spec=spec, pretrained=_weights(config)
        )
        starts.append((name, name, {k: v.clone() for k, v in model.state_dict().items()}))
    if config.get("dataset") == "mnist1d" and config.get("pretrain-epochs", 0) > 0:
        # the server's data comes from the package's generator, which anyone can run
        state = public_generator_model(config, spec)
        starts.append((f"{PUBLIC_GENERATOR}+{config['model']}", config["model"], state))
    best: dict[str, Any] = {"score": -math.inf}
    tried = {}
    for label, name, start in starts:
        model = build_model(
            name, config["dropout"], seed=config["seed"], spec=spec, pretrained=_weights(config)
        )
        kept: dict[str, torch.Tensor] | None = {} if keep_state else None
        score, rate, epoch = finetune(
            model,
            start,
            pooled,
            test,
            epochs,
            learning_rates,
            derive_seed("attack-data-only", config["seed"]),
            metric,
            config.get("optimizer", "sgd"),
            patience=patience,
            best_state=kept,
        )
        tried[label] = metric.value(score)
        if label.startswith(PUBLIC_GENERATOR):
            model.load_state_dict(start)
            tried[PUBLIC_GENERATOR] = metric.value(metric.evaluate(model, test))
        if score > best["score"]:
            best = {"score": score, "model": label, "lr": rate, "epoch": epoch}
            if kept is not None:
                best["state"] = kept
    return {**best, metric.name: metric.value(best["score"]), "tried": tried}


#: Data sets whose server pretraining text is public (the attackers can pretrain on it).
PUBLIC_SERVER_TEXT = frozenset({"brown"})


def public_corpus_reference(
    config: Mapping[str, Any],
    spec: Any,
    corpus: Split,
    pooled: Split,
    test: Split,
    budget: tuple[int, Sequence[float], int | None],
    metric: Metric = ACCURACY,
    *,
    keep_state: bool = False,
) -> dict[str, Any]:
    """The run's model pretrained as the server pretrains it, on the server's public text.

    Brown's informative prose, the server's pretraining set, ships in a public
    package: colluders can pretrain the same architecture with the same recipe
    (``pretrain-epochs``, learning rate, batch size, optimizer) from a public
    initialisation and order, then fine-tune it on their pooled data within the
    attacks' ``budget`` (epochs, learning rates, patience). Returns the
    pretrained model's score as is (``as_is``) and the best fine-tuned one.
    """
    epochs, rates, patience = budget
    seed = int(config["seed"])
    optimizer = str(config.get("optimizer", "sgd"))
    model = build_model(
        config["model"],
        config["dropout"],
        seed=derive_seed("attack-public-init", seed),
        spec=spec,
        pretrained=_weights(config),
    )
    train(
        model,
        corpus,
        int(config["pretrain-epochs"]),
        float(config["learning-rate"]),
        int(config["batch-size"]),
        seed=derive_seed("attack-pretrain", seed),
        optimizer=optimizer,
    )
    start = _copy_state(model)
    as_is = metric.evaluate(model, test)
    kept: dict[str, torch.Tensor] | None = {} if keep_state else None
    score, rate, epoch = finetune(
        model,
        start,
        pooled,
        test,
        epochs,
        rates,
        derive_seed("attack-public-corpus", seed),
        metric,
        optimizer,
        patience=patience,
        best_state=kept,
    )
    found = {
        "score": score,
        metric.name: metric.value(score),
        "as_is": metric.value(as_is),
        "lr": rate,
        "epoch": epoch,
    }
    return {**found, "state": kept} if kept is not None else found


def _check_patience(patience: int | None) -> None:
    if patience is not None and (
        not isinstance(patience, int) or isinstance(patience, bool) or patience < 1
    ):
        raise ValueError(f"patience must be an integer >= 1 or None, got {patience!r}")


def _folder_files(folder: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        (f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    )


@functools.lru_cache(maxsize=8)
def _folder_digest_of(folder: Path, files: tuple[tuple[str, int, int], ...]) -> str:
    # ``files`` (names, sizes, times) is only the memo key: the digest reads the bytes
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(name.encode() + b"\0")
        with (folder / name).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def model_files_digest(model: str) -> str | None:
    """sha256 over every file (name and bytes) of an ``hf:`` model folder; None otherwise.

    The folder decides the architecture (and, with ``hf-weights``, the start) of
    every reference: a folder replaced at the same path must not reuse them.
    """
    if not is_hf(model):
        return None
    folder = hf_folder(model).resolve()
    return _folder_digest_of(folder, _folder_files(folder))


def cached(
    cache_dir: Path | None,
    described: Mapping[str, Any],
    tensors: Sequence[torch.Tensor],
    compute: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """``compute()``, kept under ``cache_dir`` by what decides it (None: no cache).

    The key hashes ``described`` (a JSON-able recipe: :func:`run_attacks`'s holds
    :data:`CACHE_VERSION`, the :data:`REFERENCE_KEYS` of the config and, for an
    ``hf:`` model, :func:`model_files_digest`) and the bytes of ``tensors`` (the
    data it trains and scores on), so runs of a comparison that share a seed's
    clients and test set train their references once. A ``"state"`` entry (model
    weights) is kept beside the JSON.
    """
    if cache_dir is None:
        return compute()
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    stem = cache_dir / digest.hexdigest()[:32]
    found_json, found_state = stem.with_suffix(".json"), stem.with_suffix(".pt")
    if found_json.exists():
        found = json.loads(found_json.read_text())
        if found_state.exists():
            found["state"] = torch.load(found_state, weights_only=True)
        return found
    found = compute()
    private_dir(cache_dir)
    if "state" in found:
        save_private(found["state"], found_state)
    write_private(found_json, json.dumps({k: v for k, v in found.items() if k != "state"}))
    return found


@functools.lru_cache(maxsize=4)
def _public_generator_state(
    model: str, dropout: float, seed: int, spec: Any, recipe: tuple[Any, ...]
) -> dict[str, torch.Tensor]:
    examples, epochs, rate, batch, optimizer = recipe
    raw = generate_mnist1d(examples, derive_seed("attack-public-generator", seed))
    net = build_model(model, dropout, seed=derive_seed("attack-public-init", seed), spec=spec)
    signals = Split(raw.train_x, raw.train_y)
    train(
        net,
        signals,
        epochs,
        rate,
        batch,
        seed=derive_seed("attack-pretrain", seed),
        optimizer=optimizer,
    )
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def public_generator_model(config: Mapping[str, Any], spec: Any) -> dict[str, torch.Tensor]:
    """The run's model pretrained as the server pretrains it, on the public generator.

    MNIST-1D's server data comes from the ``mnist1d`` package's default
    generator: any client can draw as many signals, with seeds of its own, and
    pretrain the same architecture with the same recipe (``pretrain-epochs``,
    learning rate, batch size, optimizer). Cached per recipe: the runs of a
    comparison that share it pretrain once.
    """
    recipe = (
        int(config.get("mnist1d-server-examples", 20_000)),
        int(config["pretrain-epochs"]),
        float(config["learning-rate"]),
        int(config["batch-size"]),
        str(config.get("optimizer", "sgd")),
    )
    state = _public_generator_state(
        config["model"], float(config["dropout"]), int(config["seed"]), spec, recipe
    )
    return {k: v.clone() for k, v in state.items()}


def message_order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """Sort key of ``(round, kind, partition)``: the order the server sent them.

    Within a round the evaluate message carries the model aggregated from that
    round's training, so it is newer than the train message; a plain sort puts
    "evaluate" first and would let the older proxy win.
    """
    server_round, kind, *rest = key
    return (server_round, _KIND_ORDER.get(kind, len(_KIND_ORDER)), kind, *rest)


def collude(
    proxies: Mapping[tuple[Any, ...], Proxy],
    fill: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Pool proxies, keyed ``(round, kind, partition)``, into one model in global units.

    Returns the model and, per tensor, a boolean tensor of the entries some
    client saw. Newer messages overwrite older ones (:func:`message_order`).
    Unseen entries hold ``fill`` (or 0).
    """
    model: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for key in sorted(proxies, key=message_order):
        proxy = proxies[key]
        values = to_global_units(proxy)
        for name, tensor in values.items():
            if name not in model:
                model[name] = torch.zeros_like(tensor)
                seen[name] = torch.zeros(tensor.shape, dtype=torch.bool)
            if name not in proxy.unit_axes:
                model[name] = tensor.clone()
                seen[name][...] = True
                continue
            axis, units = proxy.unit_axes[name], proxy.visible[name]
            model[name].index_copy_(axis, units, tensor.index_select(axis, units))
            seen[name].index_fill_(axis, units, True)
    if fill is not None:
        for name, tensor in model.items():
            if name in fill and tensor.is_floating_point():
                model[name] = torch.where(seen[name], tensor, fill[name].to(tensor.dtype))
    return model, seen


def finetune(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    data: Split,
    test: Split,
    epochs: int,
    learning_rates: Sequence[float],
    seed: int,
    metric: Metric = ACCURACY,
    optimizer: str = "sgd",
    *,
    patience: int | None = None,
    best_state: dict[str, torch.Tensor] | None = None,
) -> tuple[float, float, int]:
    """Best test score of ``state`` fine-tuned on ``data``: (score, rate, epoch).

    The score is the accuracy (or minus the token loss, see :class:`Metric`).
    Epoch 0 is the model as given, so the result is never below it. With
    ``patience``, a learning rate stops after that many epochs in a row without
    a new best of its own (the attacks and the references share the rule).
    ``best_state``, when given, is filled with the best model's weights.
    """
    _check_patience(patience)
    model.load_state_dict(dict(state))
    best = (metric.evaluate(model, test), 0.0, 0)
    if best_state is not None:
        best_state.update(_copy_state(model))
    for rate in learning_rates:
        model.load_state_dict(dict(state))
        rate_best, stale = -math.inf, 0
        for epoch in range(1, epochs + 1):
            seed_epoch = derive_seed("attack-epoch", seed, epoch)
            train(model, data, 1, rate, 32, seed=seed_epoch, optimizer=optimizer)
            score = metric.evaluate(model, test)
            if score > best[0]:
                best = (score, rate, epoch)
                if best_state is not None:
                    best_state.update(_copy_state(model))
            rate_best, stale = (score, 0) if score > rate_best else (rate_best, stale + 1)
            if patience is not None and stale >= patience:
                break
    return best


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _pool(splits: Sequence[Split]) -> Split:
    return replace(
        splits[0], x=torch.cat([s.x for s in splits]), y=torch.cat([s.y for s in splits])
    )


def run_attacks(
    run_dir: Path,
    epochs: int = DEFAULT_EPOCHS,
    learning_rates: Sequence[float] | None = None,
    max_clients: int | None = DEFAULT_MAX_CLIENTS,
    *,
    patience: int | None = None,
    cache_dir: Path | None = None,
    save_models: bool = False,
) -> dict[str, Any]:
    """Run every attack on a finished run; write and return ``attacks.json``'s content.

    ``learning_rates`` default to :data:`DEFAULT_LEARNING_RATES` of the run's
    optimizer; ``patience`` stops a learning rate early (see :func:`finetune`),
    for the attacks and the references alike. ``cache_dir`` keeps the
    references (data-only, public corpus), which depend on the clients' data and
    the test set but not on the strategy. ``save_models`` writes the best
    attack's (the one ``best_attack`` names) and the references' weights to
    ``<run>/attack-models/`` (0600), e.g. to see what they write
    (:mod:`fedqsn_flwr.experiments.continuations`). Every call first empties
    that folder of an earlier call's files, which would not match its report.
    """
    _check_patience(patience)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    federation = yaml.safe_load((run_dir / "federation.yaml").read_text())
    optimizer = config.get("optimizer", "sgd")
    rates = tuple(learning_rates or DEFAULT_LEARNING_RATES[optimizer])
    received = load_saved_messages(run_dir)
    if not received:
        raise FileNotFoundError(
            f"{run_dir} has no received/ messages; run with save-messages = true"
        )
    proxies = {key: received_model(content) for key, content in received.items()}
    # the scorer's view: the server's test set (the attackers use none of it but scores)
    secret = (run_dir / SECRET_FILE).read_bytes()
    data = server_data(config, secret)
    metric = Metric.of(data.spec)
    model = build_model(
        config["model"], config["dropout"], spec=data.spec, pretrained=_weights(config)
    )
    last: dict[int, Proxy] = {}
    for (_, kind, partition), proxy in sorted(proxies.items()):
        if kind == "train":
            last[partition] = proxy  # sorted by round: the last one wins

    num_partitions = federation["num-partitions"]
    # the rows the server sent each client (the attackers hold their own data)
    rows_of = partition_config(config, data, secret) if data.pool_rows is not None else None

    def partition_data(partition: int) -> Split:
        rows = rows_of(partition, num_partitions)[PARTITION_ROWS_KEY] if rows_of else None
        return client_data(config, partition, num_partitions, rows)[0]

    results: list[dict[str, Any]] = []
    # with save_models, the weights of the best row so far: only a strictly better
    # row replaces them, so a tie keeps the first, the one max() names as best
    kept: dict[str, Any] = {"attack": None, "score": -math.inf, "state": None}

    def record(
        name: str, score: float, detail: str, state: Mapping[str, torch.Tensor] | None
    ) -> None:
        results.append(
            {"attack": name, metric.name: metric.value(score), "score": score, "detail": detail}
        )
        if save_models and score > kept["score"]:
            kept.update(attack=name, score=score, state=None if state is None else dict(state))

    def tune(
        state: Mapping[str, torch.Tensor], data_: Split, seed: int
    ) -> tuple[tuple[float, float, int], dict[str, torch.Tensor] | None]:
        """(score, rate, epoch) of the fine-tuned ``state``, and its best weights."""
        weights: dict[str, torch.Tensor] | None = {} if save_models else None
        found = finetune(
            model,
            state,
            data_,
            data.test,
            epochs,
            rates,
            seed,
            metric,
            optimizer,
            patience=patience,
            best_state=weights,
        )
        return found, weights

    as_is = {p: metric.evaluate_state(model, proxy.state, data.test) for p, proxy in last.items()}
    best_partition = max(as_is, key=as_is.get)
    mean_as_is = metric.value(sum(as_is.values()) / len(as_is))
    record(
        "proxy_as_is",
        as_is[best_partition],
        f"best of {len(as_is)} clients (partition {best_partition}); mean {mean_as_is:.4f}",
        last[best_partition].state,
    )

    attacked = sorted(last)[: max_clients or len(last)]
    tuned: dict[int, tuple[float, float, int]] = {}
    best_tuned, best_weights = -math.inf, None
    for p in attacked:
        tuned[p], weights = tune(
            last[p].state, partition_data(p), derive_seed("attack-finetune", config["seed"], p)
        )
        if tuned[p][0] > best_tuned:  # the first best client's, as max() below picks it
            best_tuned, best_weights = tuned[p][0], weights
    best_partition = max(tuned, key=lambda p: tuned[p][0])
    score, rate, epoch = tuned[best_partition]
    mean_tuned = metric.value(sum(t[0] for t in tuned.values()) / len(tuned))
    record(
        "finetune",
        score,
        f"best of {len(tuned)} clients (partition {best_partition}), lr {rate}, epoch {epoch}; "
        f"mean {mean_tuned:.4f}",
        best_weights,
    )
    del best_weights, weights

    pooled = _pool([partition_data(p) for p in sorted(last)])
    public = build_model(
        config["model"],
        config["dropout"],
        seed=config["seed"],
        spec=data.spec,
        pretrained=_weights(config),
    ).state_dict()
    for name, fill in (("collusion", None), ("public_fill", public)):
        state, seen = collude(proxies, fill)
        floats = [n for n, t in state.items() if t.is_floating_point()]
        coverage = sum(int(seen[n].sum()) for n in floats) / sum(seen[n].numel() for n in floats)
        if name == "public_fill" and coverage == 1.0:
            # nothing unseen to fill: the same model as the collusion's, same scores
            # (a twin ties with its collusion row, never beats it: its weights are not needed)
            for kind in ("as_is", "finetune"):
                twin = next(r for r in results if r["attack"] == f"collusion_{kind}")
                record(f"{name}_{kind}", twin["score"], "every parameter seen: = collusion", None)
            continue
        record(
            f"{name}_as_is",
            metric.evaluate_state(model, state, data.test),
            f"{len(proxies)} proxies pooled; {coverage:.4f} of the parameters seen",
            state,
        )
        (score, rate, epoch), weights = tune(
            state, pooled, derive_seed("attack-collusion", config["seed"])
        )
        record(
            f"{name}_finetune",
            score,
            f"fine-tuned on {len(pooled)} pooled examples, lr {rate}, epoch {epoch}",
            weights,
        )
        del weights

    final = read_metrics(run_dir / "metrics.csv")[-1]
    global_score = metric.score(final["global_loss"], final["global_accuracy"])
    best = max(results, key=lambda r: r["score"])  # the first of a tie
    if save_models and (kept["attack"] != best["attack"] or not kept["state"]):
        raise RuntimeError(
            f"save_models: no weights were kept for the best attack {best['attack']!r} "
            f"(kept: {kept['attack']!r}); nothing written"
        )
    budget = (epochs, rates, patience)
    recipe = {"cache-version": CACHE_VERSION, **{k: config.get(k) for k in REFERENCE_KEYS}}
    recipe |= {"model-files": model_files_digest(str(config["model"]))}
    recipe |= {"budget": budget, "metric": metric.name, "state": save_models}
    recipe |= {"torch": torch.__version__}
    reference = cached(
        cache_dir,
        {"reference": "data-only", **recipe},
        [pooled.x, pooled.y, data.test.x, data.test.y],
        lambda: data_only_reference(
            config,
            data.spec,
            pooled,
            data.test,
            epochs,
            rates,
            metric,
            patience=patience,
            keep_state=save_models,
        ),
    )
    leakage = knowledge_leakage(best["score"], reference["score"], global_score)
    public_corpus = None
    if config.get("dataset") in PUBLIC_SERVER_TEXT and config.get("pretrain-epochs", 0) > 0:
        public_corpus = cached(
            cache_dir,
            {"reference": "public-corpus", **recipe},
            [data.pretrain.x, pooled.x, pooled.y, data.test.x, data.test.y],
            lambda: public_corpus_reference(
                config,
                data.spec,
                data.pretrain,
                pooled,
                data.test,
                budget,
                metric,
                keep_state=save_models,
            ),
        )
    models_dir = run_dir / "attack-models"
    if models_dir.is_dir():  # an earlier call's models belong to its report, not this one's
        for file in models_dir.iterdir():
            if file.is_file() or file.is_symlink():
                file.unlink()
    if save_models:
        folder = private_dir(models_dir)
        for label, weights in (
            ("best_attack", kept["state"]),
            ("data_only", reference.get("state")),
            ("public_corpus", (public_corpus or {}).get("state")),
        ):
            if weights is not None:
                save_private(weights, folder / f"{label}.pt")
    name = metric.name
    report = {
        "run": str(run_dir),
        "metric": name,
        f"global_{name}": metric.value(global_score),
        "attacks": results,
        "best_attack": best["attack"],
        f"best_attack_{name}": best[name],
        "privacy_gap": metric.gap(global_score, best["score"]),
        "pooled_data_only": {k: v for k, v in reference.items() if k != "state"},
        f"data_only_{name}": reference[name],
        "knowledge_leakage": leakage,
        "no_model_knowledge": leakage is None,
        "epochs": epochs,
        "learning_rates": list(rates),
        "patience": patience,
        "note": "fine-tuning attacks and data-only pick their best epoch on the test set: "
        "upper bounds"
        + ("; leakage on token loss (log perplexity)" if name == "perplexity" else ""),
    }
    if public_corpus is not None:
        report["public_corpus"] = {k: v for k, v in public_corpus.items() if k != "state"}
        report[f"public_corpus_{name}"] = public_corpus[name]
        report["public_corpus_leakage"] = knowledge_leakage(
            best["score"], public_corpus["score"], global_score
        )
    write_private(run_dir / "attacks.json", json.dumps(report, indent=2))
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a text table."""
    name = report.get("metric", "accuracy")
    better = "lower is better" if name == "perplexity" else "higher is better"
    lines = [f"{'attack':<22} {name:>10}  detail ({better})", "-" * 80]
    for row in report["attacks"]:
        lines.append(f"{row['attack']:<22} {row[name]:>10.4f}  {row['detail']}")
    lines.append("-" * 80)
    reference = report["pooled_data_only"]
    start = "public init"
    if PUBLIC_GENERATOR in reference["model"]:
        start += ", pretrained on the public generator"
    lines.append(
        f"{'data_only':<22} {reference[name]:>10.4f}  reference: {reference['model']} "
        f"({start}) trained on the pooled data, lr {reference['lr']}, "
        f"epoch {reference['epoch']} (no proxy)"
    )
    lines.append(f"{'global model':<22} {report[f'global_{name}']:>10.4f}")
    gap = report["privacy_gap"]
    leakage = report["knowledge_leakage"]
    lines.append(
        f"best attack: {report['best_attack']} "
        f"({report[f'best_attack_{name}']:.4f}); privacy gap {gap:+.4f}; "
        + (
            f"knowledge leakage {leakage:.3f}"
            if leakage is not None
            else "no model knowledge to protect (global at most "
            f"{NO_KNOWLEDGE_MARGIN:g} better than data-only)"
        )
    )
    lines.append("every fine-tuning figure takes its best epoch on the test set: an upper bound")
    return "\n".join(lines)


def _at_least_one(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fedqsn_flwr.experiments.attack",
        description="Attack a finished run's model privacy.",
    )
    parser.add_argument("--run", required=True, type=Path, help="a run's output folder")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=None,
        help="fine-tuning learning rates (default: by the run's optimizer, "
        f"{DEFAULT_LEARNING_RATES})",
    )
    parser.add_argument(
        "--max-clients",
        type=int,
        default=DEFAULT_MAX_CLIENTS,
        help="fine-tune the proxies of this many clients (lowest partition ids)",
    )
    parser.add_argument(
        "--patience",
        type=_at_least_one,
        default=None,
        help="stop a learning rate after this many epochs without a new best (default: never)",
    )
    parser.add_argument(
        "--save-models",
        action="store_true",
        help="write the best attack's and the references' weights to <run>/attack-models/",
    )
    args = parser.parse_args(argv)
    try:
        report = run_attacks(
            args.run.expanduser(),
            args.epochs,
            args.learning_rates,
            args.max_clients,
            patience=args.patience,
            save_models=args.save_models,
        )
    except (FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"written to {args.run / 'attacks.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
