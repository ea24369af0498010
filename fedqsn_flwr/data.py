"""Datasets and partitions. The default, ``digits``, ships with scikit-learn.

scikit-learn's handwritten digits (1,797 real 8x8 grey images, 10 classes) are
split once per seed into three disjoint parts:

* a server-held **test** set (``test-fraction``), for every evaluation;
* a server-private **pretraining** set (``pretrain-fraction``), on which the
  server trains its proprietary starting model;
* the **client pool** (the rest), cut into ``num-partitions`` client partitions
  with flwr-datasets' ``IidPartitioner`` or ``DirichletPartitioner`` (non-IID by
  label, ``dirichlet-alpha``). Each partition keeps 20% aside for the client's
  local evaluation.

The same seed gives the same splits and partitions on the server and on every
client, which is how both sides agree without exchanging data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

DATASETS = ("digits",)
PARTITIONINGS = ("iid", "dirichlet")
LOCAL_EVAL_FRACTION = 0.2
# Mean and standard deviation of all digits pixels (scaled to [0, 1]); standardising
# the input makes SGD from a random start several times faster on this data.
PIXEL_MEAN, PIXEL_STD = 0.3054, 0.3762


@dataclass(frozen=True)
class Split:
    """Standardised images ``x`` (N, 1, 8, 8) and integer labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.numel())

    def subset(self, index: np.ndarray) -> Split:
        """The rows at ``index``."""
        rows = torch.as_tensor(index, dtype=torch.long)
        return Split(self.x[rows], self.y[rows])


@dataclass(frozen=True)
class ServerData:
    """What the server holds: its test set, its private pretraining set, and the pool."""

    test: Split
    pretrain: Split
    pool: Split


@lru_cache(maxsize=8)
def load_server_data(
    dataset: str, seed: int, test_fraction: float, pretrain_fraction: float
) -> ServerData:
    """Split ``dataset`` into test / pretraining / client pool for ``seed``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset '{dataset}'; allowed: {list(DATASETS)}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    full = Split(
        torch.tensor(
            (digits.images / 16.0 - PIXEL_MEAN) / PIXEL_STD, dtype=torch.float32
        ).unsqueeze(1),
        torch.tensor(digits.target, dtype=torch.long),
    )
    order = np.random.default_rng(seed).permutation(len(full))
    n_test = round(test_fraction * len(full))
    n_pretrain = round(pretrain_fraction * len(full))
    return ServerData(
        test=full.subset(order[:n_test]),
        pretrain=full.subset(order[n_test : n_test + n_pretrain]),
        pool=full.subset(order[n_test + n_pretrain :]),
    )


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
    dataset: str,
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
    pool = load_server_data(dataset, seed, test_fraction, pretrain_fraction).pool
    # Shuffle first: IidPartitioner cuts contiguous shards.
    shuffled = pool.subset(np.random.default_rng([seed, 1]).permutation(len(pool)))
    parts = _partition_indices(shuffled.y.numpy(), num_partitions, partitioning, alpha, seed)
    part = shuffled.subset(parts[partition_id])
    order = np.random.default_rng([seed, 2, partition_id]).permutation(len(part))
    n_eval = max(1, round(LOCAL_EVAL_FRACTION * len(part))) if len(part) > 1 else 0
    return part.subset(order[n_eval:]), part.subset(order[:n_eval])
