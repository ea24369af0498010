"""Splits and partitions: who holds which examples.

A data set (:mod:`fedqsn_flwr.datasets`; the default, ``digits``, ships with
scikit-learn) is split once per seed into three disjoint parts:

* a server-held **test** set: the data set's own test split when it has one,
  else ``test-fraction`` of the examples (digits, a text file without
  ``test.*``), for every evaluation;
* a server-private **pretraining** set (``pretrain-fraction`` of the training
  examples), on which the server trains its proprietary starting model;
* the **client pool** (the rest), cut into ``num-partitions`` client partitions
  with flwr-datasets' ``IidPartitioner`` or ``DirichletPartitioner`` (non-IID by
  label, ``dirichlet-alpha``). Each partition keeps 20% aside for the client's
  local evaluation.

The same seed gives the same splits and partitions on the server and on every
client, which is how both sides agree without exchanging data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from .datasets import (
    DATASETS,
    DataKey,
    RawData,
    is_partition_loader,
    load_raw,
    load_user_partition,
)
from .models import InputSpec

__all__ = [
    "DATASETS",
    "PARTITIONINGS",
    "DataKey",
    "ServerData",
    "Split",
    "load_client_data",
    "load_server_data",
]

PARTITIONINGS = ("iid", "dirichlet")
LOCAL_EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    """Examples ``x`` and integer labels ``y``.

    ``x`` holds float features, uint8 images (N, C, H, W) -- standardized per
    channel with ``mean``/``std`` when a batch is taken, so a CIFAR-10 pool stays
    a quarter of its float32 size in memory -- or int64 token ids (N, T).
    """

    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return int(self.y.numel())

    def subset(self, index: np.ndarray) -> Split:
        """The rows at ``index``."""
        rows = torch.as_tensor(index, dtype=torch.long)
        return replace(self, x=self.x[rows], y=self.y[rows])

    def inputs(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Model inputs of ``rows``, standardized when ``x`` holds raw pixels."""
        x = self.x[rows]
        if self.mean is None or self.std is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        return (x.to(torch.float32) / 255.0 - mean) / std


@dataclass(frozen=True)
class ServerData:
    """What the server holds: its test set, its private pretraining set, and the pool."""

    test: Split
    pretrain: Split
    pool: Split
    spec: InputSpec


def _as_key(dataset: str | DataKey) -> DataKey:
    return dataset if isinstance(dataset, DataKey) else DataKey(dataset)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scaled = images.to(torch.float64) / 255.0
    dims = [0, *range(2, images.dim())]
    mean = scaled.mean(dim=dims)
    std = scaled.std(dim=dims).clamp_min(1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _splits(raw: RawData) -> tuple[Split, Split | None]:
    stats: dict[str, tuple[float, ...]] = {}
    if raw.train_x.dtype == torch.uint8:
        mean, std = _channel_stats(raw.train_x)
        stats = {"mean": mean, "std": std}
    train = Split(raw.train_x, raw.train_y, **stats)
    test = None
    if raw.test_x is not None and raw.test_y is not None:
        test = Split(raw.test_x, raw.test_y, **stats)
    return train, test


@lru_cache(maxsize=1)
def _raw(key: DataKey) -> RawData:
    return load_raw(key)


@lru_cache(maxsize=8)
def load_server_data(
    dataset: str | DataKey, seed: int, test_fraction: float, pretrain_fraction: float
) -> ServerData:
    """Split ``dataset`` into test / pretraining / client pool for ``seed``."""
    raw = _raw(_as_key(dataset))
    full, own_test = _splits(raw)
    order = np.random.default_rng(seed).permutation(len(full))
    if own_test is None:
        n_test = round(test_fraction * len(full))
        test = full.subset(order[:n_test])
        order = order[n_test:]
    else:
        test = own_test
    n_pretrain = round(pretrain_fraction * len(full))
    if is_partition_loader(_as_key(dataset)):
        # the server's own examples are its private pretraining set; clients bring theirs
        n_pretrain = len(order)
    return ServerData(
        test=test,
        pretrain=full.subset(order[:n_pretrain]),
        pool=full.subset(order[n_pretrain:]),
        spec=raw.spec,
    )


def input_spec(dataset: str | DataKey) -> InputSpec:
    """Input shape and number of classes of ``dataset`` (loads it once per process)."""
    return _raw(_as_key(dataset)).spec


def _partition_indices(
    labels: np.ndarray, num_partitions: int, partitioning: str, alpha: float, seed: int
) -> list[np.ndarray]:
    # flwr-datasets works on an in-memory `datasets.Dataset` without network.
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = Dataset.from_dict({"index": np.arange(len(labels)), "label": labels})
    if partitioning == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif partitioning == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=2,
            self_balancing=False,
            seed=seed,
        )
    else:
        raise ValueError(f"unknown partitioning '{partitioning}'; allowed: {list(PARTITIONINGS)}")
    partitioner.dataset = table
    return [np.asarray(partitioner.load_partition(i)["index"]) for i in range(num_partitions)]


@lru_cache(maxsize=64)
def load_client_data(
    dataset: str | DataKey,
    seed: int,
    test_fraction: float,
    pretrain_fraction: float,
    partition_id: int,
    num_partitions: int,
    partitioning: str,
    alpha: float,
) -> tuple[Split, Split]:
    """A client's partition of the pool as (local train, local evaluation) splits."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is out of range for num-partitions={num_partitions}"
        )
    key = _as_key(dataset)
    if is_partition_loader(key):
        # the user's own per-client data: nothing to split or partition here
        x, y = load_user_partition(key, partition_id, num_partitions)
        stats = (
            dict(zip(("mean", "std"), _channel_stats(x), strict=True))
            if x.dtype == torch.uint8
            else {}
        )
        part = Split(x, y, **stats)
    else:
        pool = load_server_data(key, seed, test_fraction, pretrain_fraction).pool
        # Shuffle first: IidPartitioner cuts contiguous shards.
        shuffled = pool.subset(np.random.default_rng([seed, 1]).permutation(len(pool)))
        parts = _partition_indices(shuffled.y.numpy(), num_partitions, partitioning, alpha, seed)
        part = shuffled.subset(parts[partition_id])
    order = np.random.default_rng([seed, 2, partition_id]).permutation(len(part))
    n_eval = max(1, round(LOCAL_EVAL_FRACTION * len(part))) if len(part) > 1 else 0
    return part.subset(order[n_eval:]), part.subset(order[:n_eval])
