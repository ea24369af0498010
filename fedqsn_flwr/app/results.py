"""Run outputs: ``<output-dir>/<run-name>/`` with config, metrics and final model."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedqsn_flwr.app.base import LANGUAGE_MODELLING
from fedqsn_flwr.app.config import output_root
from fedqsn_flwr.app.private import private_dir, private_open, save_private, write_private
from fedqsn_flwr.flower.strategies import MessageEntry

METRIC_COLUMNS = (
    "round",
    "global_accuracy",
    "global_loss",
    "global_perplexity",
    "server_accuracy",
    "server_loss",
    "server_perplexity",
    "proxy_accuracy",
    "proxy_loss",
    "proxy_perplexity",
    "client_eval_accuracy",
    "train_loss",
    "bytes_down",
    "bytes_up",
    "num_sampled",
    "num_aggregated",
    "num_failures",
    "cosine_all",
    "rel_l2_all",
    "cosine_masked",
    "rel_l2_masked",
    "exposure",
    "feedback_kept",
    "elapsed_seconds",
)
MESSAGES_DIR = "received"


def run_name(config: Mapping[str, Any]) -> str:
    """The configured run name, or ``<UTC time>-<strategy>-seed<seed>``."""
    if config["run-name"]:
        return str(config["run-name"])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{config['strategy']}-seed{config['seed']}"


class RunRecorder:
    """Writes one run's folder as the run goes, so no finished round is lost.

    * ``config.yaml`` -- the resolved configuration;
    * ``checkpoint.pt`` -- after every round, written atomically: the global model,
      the round and the strategy's bookkeeping. Started again with the same
      configuration (same ``run-name``) and ``resume = true``, a killed run
      continues after its last finished round;
    * ``metrics.csv`` -- one row per round (round 0 is the starting model),
      appended and flushed as soon as the round ends;
    * ``messages.csv`` -- the serialized size of every message;
    * ``final_model.pt`` -- the global model's state dict (full precision);
    * ``federation.yaml`` -- ``num-partitions`` and the partition ids that took part;
    * ``received/round-RRR/<train|evaluate>-partition-PPP.pb`` -- with
      ``save-messages``, the content of every message a client received, exactly
      as sent (Flower's protobuf ``RecordDict``): the input of ``fedqsn_flwr.experiments.attack``.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.directory = output_root(config) / run_name(config)
        try:
            # the output-dir the app creates is private too; one the user made stays theirs
            private_dir(self.directory.parent, restrict_existing=False)
            private_dir(self.directory)
            probe = self.directory / ".writable"
            write_private(probe, "")
            probe.unlink()
        except OSError as err:
            raise RunFolderError(
                f"config key 'output-dir': cannot write the run folder {self.directory}: {err}"
            ) from err
        self.dataset = str(config["dataset"])
        self.metrics_path = self.directory / "metrics.csv"
        self.checkpoint_path = self.directory / "checkpoint.pt"
        self.rows: list[dict[str, float]] = []
        self._start = time.monotonic()
        self.checkpoint: dict[str, Any] | None = None
        if config["resume"] and self.checkpoint_path.exists():
            self._resume(config)
        else:
            self._write_config(config)
            with private_open(self.metrics_path, "w", newline="") as handle:
                csv.writer(handle).writerow(METRIC_COLUMNS)

    def _write_config(self, config: Mapping[str, Any]) -> None:
        write_private(self.directory / "config.yaml", yaml.safe_dump(dict(config), sort_keys=True))

    def _resume(self, config: Mapping[str, Any]) -> None:
        config_path = self.directory / "config.yaml"
        try:
            saved = yaml.safe_load(config_path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise RunFolderError(
                f"cannot resume from {self.directory}: {config_path.name} is missing or "
                f"unreadable ({err}); use another run-name or set resume = false"
            ) from err
        if not isinstance(saved, dict):
            raise RunFolderError(
                f"cannot resume from {self.directory}: {config_path.name} is not a mapping"
            )
        if saved != dict(config):
            changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise ValueError(
                f"{self.directory} holds a checkpoint of a run with another configuration "
                f"(differs in {changed}); use another run-name or set resume = false"
            )
        self.checkpoint = load_checkpoint(self.checkpoint_path)
        done = int(self.checkpoint["round"])
        try:
            rows = read_metrics(self.metrics_path)
        except (OSError, ValueError, KeyError) as err:
            raise RunFolderError(
                f"cannot resume from {self.directory}: {self.metrics_path.name} is missing or "
                f"unreadable ({err}); use another run-name or set resume = false"
            ) from err
        # rows written after the checkpoint (a kill between the two) are redone, and a
        # round written twice (a kill between a row and its checkpoint) counts once
        by_round = {int(r["round"]): r for r in rows if r["round"] <= done}
        self.rows = [by_round[r] for r in sorted(by_round)]
        self._start -= self.rows[-1]["elapsed_seconds"] if self.rows else 0.0
        with private_open(self.metrics_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(METRIC_COLUMNS)
            writer.writerows([_cell(r.get(c, math.nan)) for c in METRIC_COLUMNS] for r in self.rows)

    def save_checkpoint(
        self, server_round: int, state: Mapping[str, torch.Tensor], strategy: Mapping[str, Any]
    ) -> None:
        """Atomically store what a restart needs to continue after ``server_round``."""
        save_private(
            {"round": server_round, "global": dict(state), "strategy": dict(strategy)},
            self.checkpoint_path,
        )

    def add_round(self, values: Mapping[str, float]) -> dict[str, float]:
        """Append one round's row (missing values are written empty)."""
        row = {col: values.get(col, math.nan) for col in METRIC_COLUMNS}
        row["elapsed_seconds"] = round(time.monotonic() - self._start, 3)
        self.rows.append(row)
        with private_open(self.metrics_path, "a", newline="") as handle:
            csv.writer(handle).writerow(_cell(row[col]) for col in METRIC_COLUMNS)
        return row

    def save_received(self, server_round: int, partition_id: int, message: Message) -> None:
        """Store what one client received (see :func:`load_saved_messages`)."""
        folder = private_dir(self.directory / MESSAGES_DIR / f"round-{server_round:03d}")
        data = recorddict_to_proto(message.content).SerializeToString()
        kind = message.metadata.message_type
        write_private(folder / f"{kind}-partition-{partition_id:03d}.pb", data)

    def write_federation(self, num_partitions: int, partition_ids: list[int]) -> None:
        """Write ``federation.yaml``: how the client pool was partitioned."""
        info = {"num-partitions": num_partitions, "partition-ids": partition_ids}
        write_private(self.directory / "federation.yaml", yaml.safe_dump(info))

    def write_messages(self, entries: Iterable[MessageEntry]) -> None:
        """Write ``messages.csv`` (one line per message sent or received)."""
        with private_open(self.directory / "messages.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(MessageEntry)])
            writer.writeheader()
            writer.writerows(asdict(entry) for entry in entries)

    def save_model(self, state: Mapping[str, torch.Tensor]) -> Path:
        """Save the final global model's state dict."""
        path = self.directory / "final_model.pt"
        save_private(state, path)
        return path

    def summary_table(self) -> str:
        """The per-round metrics as a fixed-width text table (perplexity for a language model)."""
        score = "perplexity" if self.dataset in LANGUAGE_MODELLING else "accuracy"
        columns = (
            "round",
            f"global_{score}",
            f"server_{score}",
            f"proxy_{score}",
            "train_loss",
            "bytes_down",
            "bytes_up",
            "num_failures",
        )
        header = " ".join(f"{c:>15}" for c in columns)
        lines = [header, "-" * len(header)]
        for row in self.rows:
            lines.append(" ".join(f"{_cell(row.get(c, math.nan)):>15}" for c in columns))
        return "\n".join(lines)


class RunFolderError(ValueError):
    """A run folder that cannot be written or resumed (the message names the file)."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's ``checkpoint.pt``, loaded with ``weights_only=True`` and checked.

    ``weights_only`` unpickles tensors, containers and numbers only: a crafted
    checkpoint cannot run code. A truncated, foreign or malformed file raises
    :class:`RunFolderError` naming it.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file: all mean the same
        raise RunFolderError(
            f"cannot resume: {path} is not a readable checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); use another run-name or set "
            "resume = false"
        ) from err
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("round"), int)
        or not isinstance(checkpoint.get("global"), dict)
        or not isinstance(checkpoint.get("strategy"), dict)
    ):
        raise RunFolderError(
            f"cannot resume: {path} is not a checkpoint of this app (needs round, global, "
            "strategy); use another run-name or set resume = false"
        )
    return checkpoint


def _cell(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4f}"
    return str(int(value))


def load_saved_messages(run_dir: Path) -> dict[tuple[int, str, int], RecordDict]:
    """Every saved message of a run, by (round, message type, partition id)."""
    received = {}
    for file in sorted((run_dir / MESSAGES_DIR).glob("round-*/*-partition-*.pb")):
        server_round = int(file.parent.name.split("-")[1])
        kind, _, partition = file.stem.split("-")
        proto = ProtoRecordDict.FromString(file.read_bytes())
        received[(server_round, kind, int(partition))] = recorddict_from_proto(proto)
    return received


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Read a ``metrics.csv`` back as floats (empty cells become NaN)."""
    with path.open() as handle:
        return [
            {k: float(v) if v != "" else math.nan for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]
