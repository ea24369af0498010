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

Which rows are the server's (test and pretraining) and which the pool's, and
how the pool is cut into partitions, derive from the server secret
(:mod:`fedqsn_flwr.core.secret`), which no client has: the server sends every
client the rows of its own partition with each message
(:data:`~fedqsn_flwr.flower.protocol.PARTITION_ROWS_KEY`), so a client learns
its rows and nothing about the others'. A coalition of clients learns only
that the server's rows are among those none of them holds. (Digits and the
other bundled data sets are public as a whole: anyone may train on every row of
them, the server's included. What stays the server's is which rows it used.)
MNIST-1D is generated instead: the clients' pool from the run's public ``seed``
(each client generates the pool and takes its partition), the server's
examples from the secret.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fedqsn_flwr.app.base import DATASETS, PARTITIONINGS, InputSpec, Split
from fedqsn_flwr.app.brown import IMAGINATIVE, INFORMATIVE
from fedqsn_flwr.app.sources import (
    MNIST1D_LENGTH,
    DataKey,
    RawData,
    data_key,
    generate_mnist1d,
    is_partition_loader,
    load_raw,
    load_user_partition,
)
from fedqsn_flwr.core.secret import derive_seed, secret_rng
from fedqsn_flwr.flower.protocol import PARTITION_ROWS_KEY

__all__ = [
    "DATASETS",
    "PARTITIONINGS",
    "DataKey",
    "ServerData",
    "Split",
    "load_client_data",
    "load_server_data",
    "partition_rows",
]

LOCAL_EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class ServerData:
    """What the server holds: its test set, its private pretraining set, and the pool."""

    test: Split
    pretrain: Split
    pool: Split
    spec: InputSpec
    #: Data-set row of every pool example (None: the pool is not cut from rows the
    #: server holds, as for MNIST-1D and partition loaders).
    pool_rows: np.ndarray | None = None
    #: Document of every pool row and genre of every document, for text cut into
    #: blocks (``brown``): partitions then keep documents whole.
    pool_documents: np.ndarray | None = None
    genres: tuple[str, ...] = ()


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
    length: int, secret: bytes, test_fraction: float, pretrain_fraction: float, own_test: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(server rows, pool rows), drawn from the server ``secret``."""
    order = secret_rng(secret, "server-rows").permutation(length)
    n_server = round(pretrain_fraction * length)
    if not own_test:
        n_server += round(test_fraction * length)
    return order[:n_server], np.sort(order[n_server:])


@lru_cache(maxsize=8)
def load_pool(dataset: str | DataKey, seed: int, size: int) -> Split:
    """MNIST-1D's client pool: ``size`` signals generated from the public ``seed``."""
    key = _as_key(dataset)
    if key.dataset != "mnist1d":
        raise ValueError(
            f"data set {key.dataset!r} has no public pool: the server draws its rows from "
            "its secret and sends each client its partition's rows"
        )
    raw = generate_mnist1d(size, derive_seed("mnist1d-pool", seed), key.mnist1d_client_shear)
    return _splits(raw)[0]


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


def _document_rows(documents: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(documents, chosen))


def _brown_server(key: DataKey, secret: bytes, test_fraction: float) -> ServerData:
    """Brown's split by document: the server's pretraining text and test set.

    The server pretrains on the informative prose; the clients and the test set
    share the imaginative prose, in whole documents: ``test_fraction`` of each
    genre's documents (at least one) are held out for the test set, which ones
    drawn from the secret.
    """
    raw = _raw(key)
    assert raw.documents is not None
    full = _splits(raw)[0]
    genres = np.asarray(raw.genres)
    rng = secret_rng(secret, "server-rows")
    test_docs: list[int] = []
    client_docs: list[int] = []
    for genre in IMAGINATIVE:
        docs = rng.permutation(np.flatnonzero(genres == genre))
        n_test = max(1, round(test_fraction * len(docs))) if test_fraction > 0 else 0
        test_docs += docs[:n_test].tolist()
        client_docs += docs[n_test:].tolist()
    server_docs = np.flatnonzero(np.isin(genres, INFORMATIVE))
    pool_rows = _document_rows(raw.documents, np.asarray(client_docs))
    return ServerData(
        test=full.subset(_document_rows(raw.documents, np.asarray(test_docs))),
        pretrain=full.subset(_document_rows(raw.documents, server_docs)),
        pool=full.subset(pool_rows),
        spec=raw.spec,
        pool_rows=pool_rows,
        pool_documents=raw.documents[pool_rows],
        genres=raw.genres,
    )


@lru_cache(maxsize=8)
def load_server_data(
    dataset: str | DataKey,
    *,
    seed: int,
    test_fraction: float,
    pretrain_fraction: float,
    secret: bytes,
) -> ServerData:
    """The server's test set, private pretraining set and the client pool.

    Which rows are the server's, and which of those its test set, come from the
    server ``secret`` (:mod:`fedqsn_flwr.core.secret`); ``seed`` is not used for
    them (kept in the signature: a cache key and the run's identity). With a
    data set's own test split the pretraining rows are the secret share of the
    training rows. MNIST-1D's server and test examples are generated from the
    secret (its ``pool`` is left empty: its size depends on the number of
    partitions; see :func:`load_pool`).
    """
    key = _as_key(dataset)
    if key.dataset == "mnist1d":
        return _mnist1d_server(key, secret)
    if key.dataset == "brown":
        return _brown_server(key, secret, test_fraction)
    raw = _raw(key)
    full, own_test = _splits(raw)
    pool_rows: np.ndarray | None
    if is_partition_loader(key):
        # the server's own examples are its private pretraining set; clients bring theirs
        server, pool_rows = np.arange(len(full)), None
    else:
        server, pool_rows = _split_rows(
            len(full), secret, test_fraction, pretrain_fraction, own_test is not None
        )
    if own_test is None:
        n_test = round(test_fraction * len(full))
        test, server = full.subset(server[:n_test]), server[n_test:]
    else:
        test = own_test
    pool = full.subset(pool_rows if pool_rows is not None else np.arange(0))
    return ServerData(
        test=test,
        pretrain=full.subset(server),
        pool=pool,
        spec=raw.spec,
        pool_rows=pool_rows,
    )


def partition_rows(
    data: ServerData,
    *,
    secret: bytes,
    seed: int,
    num_partitions: int,
    partitioning: str,
    alpha: float,
) -> list[np.ndarray]:
    """The data-set rows (sorted) of every client partition of the server's pool.

    The pool is shuffled from the ``secret`` (flwr-datasets' ``IidPartitioner``
    cuts contiguous shards) and cut by the partitioner (``DirichletPartitioner``
    seeded with the public ``seed``). The server sends each client its own.
    """
    if data.pool_rows is None:
        raise ValueError("this data set's clients hold their own data: there are no pool rows")
    if data.pool_documents is not None:
        return _document_partitions(data, secret, num_partitions, partitioning)
    if partitioning == "genre":
        raise ValueError("partitioning 'genre' needs documents with genres (dataset 'brown')")
    order = secret_rng(secret, "pool-shuffle").permutation(len(data.pool_rows))
    labels = _partition_labels(data.pool.y[torch.from_numpy(order)], partitioning)
    parts = _partition_indices(labels, num_partitions, partitioning, alpha, seed)
    return [np.sort(data.pool_rows[order[part]]) for part in parts]


def _genre_shares(counts: dict[str, int], num_partitions: int) -> dict[str, int]:
    """Partitions per genre, proportional to its documents (largest remainder)."""
    total = sum(counts.values())
    exact = {genre: num_partitions * n / total for genre, n in counts.items()}
    shares = {genre: int(x) for genre, x in exact.items()}
    by_remainder = sorted(exact, key=lambda g: shares[g] - exact[g])
    for genre in by_remainder[: num_partitions - sum(shares.values())]:
        shares[genre] += 1
    return shares


def _document_partitions(
    data: ServerData, secret: bytes, num_partitions: int, partitioning: str
) -> list[np.ndarray]:
    """Rows of whole documents per partition.

    ``iid``: the documents shuffled and dealt out. ``genre``: a genre's
    documents are split among the partitions its size earns it (largest
    remainder); a genre too small to earn one joins the partition with the
    fewest documents.
    """
    assert data.pool_rows is not None and data.pool_documents is not None
    rng = secret_rng(secret, "pool-shuffle")
    documents = np.unique(data.pool_documents)
    if len(documents) < num_partitions:
        raise ValueError(
            f"{len(documents)} client documents cannot fill {num_partitions} partitions"
        )
    parts: list[list[int]]
    if partitioning == "iid":
        shuffled = rng.permutation(documents)
        parts = [shuffled[i::num_partitions].tolist() for i in range(num_partitions)]
    elif partitioning == "genre":
        by_genre = {
            genre: rng.permutation([d for d in documents if data.genres[d] == genre]).tolist()
            for genre in sorted({data.genres[d] for d in documents})
        }
        shares = _genre_shares({g: len(d) for g, d in by_genre.items()}, num_partitions)
        parts = []
        for genre, docs in by_genre.items():
            parts += [docs[i :: shares[genre]] for i in range(shares[genre])]
        for genre, docs in by_genre.items():
            if shares[genre] == 0:
                min(parts, key=len).extend(docs)
    else:
        raise ValueError(
            f"partitioning '{partitioning}' splits by class label; documents have none: "
            "use 'iid' or 'genre'"
        )
    return [data.pool_rows[np.isin(data.pool_documents, part)] for part in parts]


def _partition_labels(y: torch.Tensor, partitioning: str) -> np.ndarray:
    if y.dim() == 1:
        return y.numpy()
    if partitioning == "iid":
        return np.zeros(len(y), dtype=np.int64)  # token targets: no class
    raise ValueError(
        f"partitioning '{partitioning}' splits by class label; a language-modelling "
        "data set has none: use partitioning = 'iid'"
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
    *,
    seed: int,
    partition_id: int,
    num_partitions: int,
    partitioning: str,
    alpha: float,
    rows: tuple[int, ...] | None = None,
) -> tuple[Split, Split]:
    """A client's partition as (local train, local evaluation) splits.

    ``rows``: the data-set rows of this partition, as the server sent them
    (:data:`~fedqsn_flwr.flower.protocol.PARTITION_ROWS_KEY`); needed for every
    data set but MNIST-1D (whose pool the client generates from ``seed`` and
    partitions itself) and partition loaders (the user's own data).
    """
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
    elif key.dataset == "mnist1d":
        pool = load_pool(key, seed, key.mnist1d_client_examples * num_partitions)
        # Shuffle first: IidPartitioner cuts contiguous shards.
        shuffled = pool.subset(
            np.random.default_rng(derive_seed("pool-shuffle", seed)).permutation(len(pool))
        )
        labels = _partition_labels(shuffled.y, partitioning)
        parts = _partition_indices(labels, num_partitions, partitioning, alpha, seed)
        part = shuffled.subset(parts[partition_id])
    else:
        part = _given_rows(key, rows)
    rng = np.random.default_rng(derive_seed("local-evaluation", seed, partition_id))
    order = rng.permutation(len(part))
    n_eval = max(1, round(LOCAL_EVAL_FRACTION * len(part))) if len(part) > 1 else 0
    return part.subset(order[n_eval:]), part.subset(order[:n_eval])


def _given_rows(key: DataKey, rows: tuple[int, ...] | None) -> Split:
    """The rows the server assigned to this client, checked."""
    if rows is None:
        raise ValueError(
            f"data set {key.dataset!r}: the server sends each client the rows of its "
            f"partition ('{PARTITION_ROWS_KEY}' in the message config) and this message has "
            "none (a ServerApp of another version?)"
        )
    full = _splits(_raw(key))[0]
    index = np.asarray(rows, dtype=np.int64)
    if index.ndim != 1 or len(index) == 0:
        raise ValueError(f"'{PARTITION_ROWS_KEY}' must be a non-empty list of row numbers")
    if index.min() < 0 or index.max() >= len(full) or len(np.unique(index)) != len(index):
        raise ValueError(
            f"'{PARTITION_ROWS_KEY}' must hold distinct row numbers in [0, {len(full)})"
        )
    return full.subset(index)


def server_data(config: Mapping[str, Any], secret: bytes) -> ServerData:
    """:func:`load_server_data` under a run ``config``: the server's test, pretraining and pool."""
    return load_server_data(
        data_key(config),
        seed=config["seed"],
        test_fraction=config["test-fraction"],
        pretrain_fraction=config["pretrain-fraction"],
        secret=secret,
    )


def client_data(
    config: Mapping[str, Any],
    partition_id: int,
    num_partitions: int,
    rows: Sequence[int] | None = None,
) -> tuple[Split, Split]:
    """:func:`load_client_data` under a run ``config``: a client's (train, local evaluation).

    ``rows``: the partition's rows as the server sent them (None where the
    client makes its own data: MNIST-1D, a partition loader).
    """
    return load_client_data(
        data_key(config),
        seed=config["seed"],
        partition_id=partition_id,
        num_partitions=num_partitions,
        partitioning=config["partitioning"],
        alpha=config["dirichlet-alpha"],
        rows=tuple(int(r) for r in rows) if rows is not None else None,
    )
