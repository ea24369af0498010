from functools import partial

import numpy as np
import pytest
import torch

from fedqsn_flwr.app.splits import load_client_data, load_server_data
from fedqsn_flwr.core.secret import from_text
from tests.helpers import TEST_SECRET, client_split


def test_server_splits_are_disjoint_and_cover_the_digits():
    data = load_server_data(
        "digits", seed=1, test_fraction=0.2, pretrain_fraction=0.2, secret=TEST_SECRET
    )
    assert len(data.test) + len(data.pretrain) + len(data.pool) == 1797
    assert len(data.test) == 359 and len(data.pretrain) == 359
    assert tuple(data.test.x.shape[1:]) == (1, 8, 8)
    assert abs(float(torch.cat([data.test.x, data.pool.x]).mean())) < 0.05  # standardised
    from sklearn.datasets import load_digits

    labels = torch.cat([data.test.y, data.pretrain.y, data.pool.y])
    assert torch.equal(torch.bincount(labels), torch.bincount(torch.tensor(load_digits().target)))
    # the server's rows come from the secret, not the public seed
    assert torch.equal(
        data.test.x,
        load_server_data(
            "digits", seed=2, test_fraction=0.2, pretrain_fraction=0.2, secret=TEST_SECRET
        ).test.x,
    )
    other = load_server_data(
        "digits", seed=1, test_fraction=0.2, pretrain_fraction=0.2, secret=from_text("another")
    )
    assert not torch.equal(data.test.x, other.test.x)


def _partitions(partitioning, alpha=0.5, seed=1, n=5):
    return [client_split("digits", seed, 0.2, 0.2, i, n, partitioning, alpha) for i in range(n)]


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_partitions_cover_the_pool_and_are_deterministic(partitioning):
    parts = _partitions(partitioning)
    pool = load_server_data(
        "digits", seed=1, test_fraction=0.2, pretrain_fraction=0.2, secret=TEST_SECRET
    ).pool
    assert sum(len(t) + len(e) for t, e in parts) == len(pool)
    load_client_data.cache_clear()
    again = _partitions(partitioning)
    for (t1, e1), (t2, e2) in zip(parts, again, strict=True):
        assert torch.equal(t1.y, t2.y) and torch.equal(e1.x, e2.x)


def test_dirichlet_is_non_iid_and_iid_is_balanced():
    def label_share(parts):
        hist = np.stack([np.bincount(t.y.numpy(), minlength=10) / len(t) for t, _ in parts])
        return hist.max()

    assert label_share(_partitions("dirichlet", alpha=0.1)) > 0.4
    assert label_share(_partitions("iid")) < 0.25


def test_partition_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        load_client_data(
            "digits", seed=1, partition_id=5, num_partitions=5, partitioning="iid", alpha=0.5
        )


def test_a_client_needs_valid_rows_from_its_server():
    first_of_five = partial(
        load_client_data,
        "digits",
        seed=1,
        partition_id=0,
        num_partitions=5,
        partitioning="iid",
        alpha=0.5,
    )
    with pytest.raises(ValueError, match="partition-rows"):
        first_of_five()  # no rows sent
    for rows in ((), (0, 0, 1), (-1, 2), (0, 1797)):
        with pytest.raises(ValueError, match="partition-rows"):
            first_of_five(rows=rows)
    train, local = first_of_five(rows=tuple(range(10)))
    assert len(train) + len(local) == 10
