"""Splits and partitions: who holds which examples.

A data set (:mod:`fedqsn_flwr.app.sources`; the default, ``digits``, ships with
scikit-learn) is split into three disjoint parts:

* a server-held **test** set: the data set's own test split when it has one,
  else ``test-fraction`` of the examples (digits, a text file without
  ``test.*``), for every evaluation;
* a server-private **pretraining** set (``pretrain-fraction`` of the training
  examples), on which the server trains its proprietary starting model;
* the **client pool** (the rest), cut into ``num-partitions`` client partitions
  with flwr-datasets' ``IidPartitioner`` or ``DirichletPartitioner`` (non-IID by
  label, ``dirichlet-alpha``). Each partition keeps 20% aside for the client's
  local evaluation.

The client pool and its partitions come from the run's ``seed``, which every
client has: that is how both sides agree without exchanging data. Which of the
server's rows are its test set and which its pretraining set comes from the
server secret (:mod:`fedqsn_flwr.core.secret`), which no client has.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from fedqsn_flwr.app.models import InputSpec
from fedqsn_flwr.app.sources import (
    DATASETS,
    MNIST1D_LENGTH,
    DataKey,
    RawData,
    generate_mnist1d,
    is_partition_loader,
    load_raw,
    load_user_partition,
)
from fedqsn_flwr.core.masking import derive_seed
from fedqsn_flwr.core.secret import secret_rng

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
    """Examples ``x`` and integer labels ``y`` (one per example, or per token).

    ``x`` holds float features, uint8 images (N, C, H, W) -- standardized per
    channel with ``mean``/``std`` when a batch is taken, so a CIFAR-10 pool stays
    a quarter of its float32 size in memory -- or int64 token ids (N, T).
    """

    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

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


def _split_rows(
    length: int, seed: int, test_fraction: float, pretrain_fraction: float, own_test: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(server rows, pool rows): the public part of the split, from ``seed`` alone.

    Clients compute their pool from the run's seed; which of the server's rows
    are its test set and which its pretraining set is the secret part
    (:func:`load_server_data`).
    """
    order = np.random.default_rng(seed).permutation(length)
    n_server = round(pretrain_fraction * length)
    if not own_test:
        n_server += round(test_fraction * length)
    return order[:n_server], order[n_server:]


@lru_cache(maxsize=8)
def load_pool(
    dataset: str | DataKey, seed: int, test_fraction: float, pretrain_fraction: float, size: int = 0
) -> Split:
    """The client pool: what all clients hold together, from the public ``seed``.

    ``size`` is the pool size of a generated data set (MNIST-1D); others ignore it.
    """
    key = _as_key(dataset)
    if key.dataset == "mnist1d":
        raw = generate_mnist1d(size, derive_seed("mnist1d-pool", seed), key.mnist1d_client_shear)
        return _splits(raw)[0]
    raw = _raw(key)
    full, own_test = _splits(raw)
    if is_partition_loader(key):
        return full.subset(np.arange(0))
    _, pool = _split_rows(len(full), seed, test_fraction, pretrain_fraction, own_test is not None)
    return full.subset(pool)


def _mnist1d_server(key: DataKey, secret: bytes) -> ServerData:
    pretrain = generate_mnist1d(key.mnist1d_server_examples, secret_rng(secret, "mnist1d-server"))
    test = generate_mnist1d(
        key.mnist1d_test_examples, secret_rng(secret, "mnist1d-test"), key.mnist1d_client_shear
    )
    return ServerData(
        test=_splits(test)[0],
        pretrain=_splits(pretrain)[0],
        pool=Split(torch.zeros(0, *pretrain.spec.shape), torch.zeros(0, dtype=torch.long)),
        spec=pretrain.spec,
    )


@lru_cache(maxsize=8)
def load_server_data(
    dataset: str | DataKey,
    seed: int,
    test_fraction: float,
    pretrain_fraction: float,
    secret: bytes,
) -> ServerData:
    """The server's test set, private pretraining set and the client pool.

    The pool is public (:func:`load_pool`, from ``seed``); which of the server's
    own rows are its test set and which its pretraining set comes from the server
    ``secret`` (:mod:`fedqsn_flwr.core.secret`). With a data set's own test split the
    pretraining rows are the training rows outside the pool. MNIST-1D's server
    and test examples are generated from the secret (its ``pool`` is left empty:
    its size depends on the number of partitions; see :func:`load_pool`).
    """
    key = _as_key(dataset)
    if key.dataset == "mnist1d":
        return _mnist1d_server(key, secret)
    raw = _raw(key)
    full, own_test = _splits(raw)
    if is_partition_loader(key):
        # the server's own examples are its private pretraining set; clients bring theirs
        server, pool = np.arange(len(full)), np.arange(0)
    else:
        server, pool = _split_rows(
            len(full), seed, test_fraction, pretrain_fraction, own_test is not None
        )
    if own_test is None:
        server = server[secret_rng(secret, "split").permutation(len(server))]
        n_test = round(test_fraction * len(full))
        test, server = full.subset(server[:n_test]), server[n_test:]
    else:
        test = own_test
    return ServerData(
        test=test, pretrain=full.subset(server), pool=full.subset(pool), spec=raw.spec
    )


def input_spec(dataset: str | DataKey) -> InputSpec:
    """Input shape and number of classes of ``dataset`` (loads it once per process)."""
    key = _as_key(dataset)
    if key.dataset == "mnist1d":
        return InputSpec("signal", (1, MNIST1D_LENGTH), 10)
    return _raw(key).spec


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
        size = key.mnist1d_client_examples * num_partitions
        pool = load_pool(key, seed, test_fraction, pretrain_fraction, size)
        # Shuffle first: IidPartitioner cuts contiguous shards.
        shuffled = pool.subset(
            np.random.default_rng(derive_seed("pool-shuffle", seed)).permutation(len(pool))
        )
        if shuffled.y.dim() == 1:
            labels = shuffled.y.numpy()
        elif partitioning == "iid":
            labels = np.zeros(len(shuffled), dtype=np.int64)  # token targets: no class
        else:
            raise ValueError(
                f"partitioning '{partitioning}' splits by class label; a language-modelling "
                "data set has none: use partitioning = 'iid'"
            )
        parts = _partition_indices(labels, num_partitions, partitioning, alpha, seed)
        part = shuffled.subset(parts[partition_id])
    rng = np.random.default_rng(derive_seed("local-evaluation", seed, partition_id))
    order = rng.permutation(len(part))
    n_eval = max(1, round(LOCAL_EVAL_FRACTION * len(part))) if len(part) > 1 else 0
    return part.subset(order[n_eval:]), part.subset(order[:n_eval])
