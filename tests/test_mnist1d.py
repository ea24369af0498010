"""MNIST-1D through the ``dataset`` key: generated offline, split by seed and secret."""

import random

import numpy as np
import pytest
import torch

from fedqsn_flwr.app.config import DEFAULTS, validate
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.sources import DataError, DataKey, data_key, generate_mnist1d
from fedqsn_flwr.app.splits import input_spec, load_client_data, load_pool, load_server_data
from fedqsn_flwr.core.masking import policy_for_model
from fedqsn_flwr.core.secret import from_text


def _key(**kw):
    config = validate({**DEFAULTS, "dataset": "mnist1d", **kw})
    return data_key(config)


def test_generation_is_seeded_offline_and_leaves_global_generators_alone():
    np.random.seed(123)
    random.seed(123)
    before = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    a = generate_mnist1d(200, seed=5)
    after = (np.random.random(), random.random())
    assert before == after  # make_dataset reseeds them; they are put back
    b = generate_mnist1d(200, seed=5)
    c = generate_mnist1d(200, seed=6)
    assert a.train_x.shape == (200, 1, 40) and a.train_x.dtype == torch.float32
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    assert torch.bincount(a.train_y).tolist() == [20] * 10
    # each set is standardised with its own statistics
    assert abs(float(a.train_x.mean())) < 1e-4 and abs(float(a.train_x.std()) - 1) < 1e-2
    with pytest.raises(DataError, match="at least 10"):
        generate_mnist1d(5, seed=1)


def test_shear_shifts_the_clients_distribution():
    same = generate_mnist1d(500, seed=1, shear_scale=0.75)
    shifted = generate_mnist1d(500, seed=1, shear_scale=1.25)
    assert not torch.allclose(same.train_x, shifted.train_x)


def test_server_data_comes_from_the_secret_and_the_pool_from_the_seed():
    key = _key(**{"mnist1d-server-examples": 300, "mnist1d-test-examples": 100})
    a = load_server_data(
        key, seed=1, test_fraction=0.2, pretrain_fraction=0.1, secret=from_text("a")
    )
    b = load_server_data(
        key, seed=1, test_fraction=0.2, pretrain_fraction=0.1, secret=from_text("b")
    )
    assert len(a.pretrain) == 300 and len(a.test) == 100 and a.spec.kind == "signal"
    assert not torch.equal(a.pretrain.x, b.pretrain.x)
    assert not torch.equal(a.test.x, b.test.x)
    assert input_spec(key) == a.spec
    pool = load_pool(key, 1, 4 * key.mnist1d_client_examples)
    assert len(pool) == 4 * 125
    parts = [
        load_client_data(
            key, seed=1, partition_id=p, num_partitions=4, partitioning="iid", alpha=0.5
        )
        for p in range(4)
    ]
    assert [len(train) for train, _ in parts] == [100] * 4
    assert [len(local) for _, local in parts] == [25] * 4
    together = torch.cat([torch.cat([t.x, e.x]) for t, e in parts]).flatten(1)
    assert torch.equal(together.sort(0).values, pool.x.flatten(1).sort(0).values)
    # another seed, another pool
    assert not torch.equal(load_pool(key, 2, 500).x, pool.x)


def test_mnist1d_models_and_their_masks():
    spec = input_spec(DataKey("mnist1d"))
    x = torch.randn(3, 1, 40)
    mlp = build_model("mlp512", 0.3, spec=spec)
    assert mlp(x).shape == (3, 10)
    assert sum(p.numel() for p in mlp.parameters()) == 288_778
    policy = policy_for_model(mlp)
    assert dict(policy.unit_axes) == {"fc2.weight": 1, "fc3.weight": 1}
    assert policy.unit_counts["fc2.weight"] == 512
    cnn = build_model("cnn1d", spec=spec)
    assert cnn(x).shape == (3, 10)
    with pytest.raises(ValueError, match="signals"):
        build_model("cnn1d")  # digits are images
