"""The server secret: what clients must not predict derives from it, and only from it."""

import os
import stat

import numpy as np
import pytest
import torch
import yaml

from fedqsn_flwr.app.config import DEFAULTS, ConfigError, validate
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.results import load_saved_messages
from fedqsn_flwr.app.server import build_strategy
from fedqsn_flwr.app.sources import DataKey
from fedqsn_flwr.app.splits import load_pool, load_server_data, partition_rows
from fedqsn_flwr.core.masking import draw_server_mask, policy_for_model
from fedqsn_flwr.core.secret import (
    SECRET_ENV,
    SECRET_FILE,
    SecretError,
    from_text,
    resolve_secret,
    secret_entropy,
    store_secret,
)
from fedqsn_flwr.flower.proxy import received_model
from fedqsn_flwr.flower.strategies import FedQSN


def test_secret_entropy_differs_by_purpose_keys_and_secret():
    a, b = from_text("a"), from_text("b")
    seeds = {
        secret_entropy(a, "server-mask"),
        secret_entropy(a, "client-mask"),
        secret_entropy(a, "client-mask", 1, 1),
        secret_entropy(a, "client-mask", 1, 1, 0),  # trailing zero: still another value
        secret_entropy(a, "client-mask", 1, 10),
        secret_entropy(b, "server-mask"),
    }
    assert len(seeds) == 6
    assert secret_entropy(a, "x", 3) == secret_entropy(a, "x", 3)
    assert all(2**128 <= s < 2**256 for s in seeds)  # the secret's 256 bits, not a seed's 32
    with pytest.raises(SecretError, match="32 bytes"):
        secret_entropy(b"short", "x")
    # a node id (unsigned 64-bit) is a valid key: nodes without a partition id use theirs
    last = secret_entropy(a, "client-mask", 1, 1, 2**64 - 1)
    assert last != secret_entropy(a, "client-mask", 1, 1, 0)
    with pytest.raises(SecretError, match="0..2"):
        secret_entropy(a, "x", -1)


def test_resolve_secret_order_and_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fresh1, source = resolve_secret({"server-secret-file": ""}, run, False, environ={})
    fresh2, _ = resolve_secret({"server-secret-file": ""}, run, False, environ={})
    assert source == "fresh random bytes" and fresh1 != fresh2 and len(fresh1) == 32
    file = tmp_path / "secret.txt"
    file.write_text("my reproducible secret\n")
    from_file, source = resolve_secret({"server-secret-file": str(file)}, run, False, environ={})
    assert source == "server-secret-file" and from_file == from_text(file.read_bytes())
    from_env, source = resolve_secret(
        {"server-secret-file": str(file)}, run, False, environ={SECRET_ENV: "other"}
    )
    assert source.startswith("environment") and from_env == from_text("other")
    # a resumed run keeps its stored secret, and refuses an explicit other one
    store_secret(run, fresh1)
    assert stat.S_IMODE(os.stat(run / SECRET_FILE).st_mode) == 0o600
    assert resolve_secret({"server-secret-file": ""}, run, True, environ={})[0] == fresh1
    with pytest.raises(SecretError, match="another server secret"):
        resolve_secret({"server-secret-file": str(file)}, run, True, environ={})
    with pytest.raises(SecretError, match="cannot read"):
        resolve_secret({"server-secret-file": str(tmp_path / "nope")}, run, False, environ={})


def test_build_strategy_reads_the_configured_secret_like_the_server_app(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    file = tmp_path / "secret"
    file.write_text("my model's secret")
    config = validate({**DEFAULTS, "server-mask-ratio": 0.5, "server-secret-file": str(file)})
    model = build_model("cnn")
    first, second = (build_strategy(config, model, None) for _ in range(2))
    expected = resolve_secret(config, tmp_path, resuming=False)[0]
    assert (
        first.server_secret == second.server_secret == expected == from_text(b"my model's secret")
    )
    # the environment variable wins, as in the ServerApp
    monkeypatch.setenv(SECRET_ENV, "from the environment")
    assert build_strategy(config, model, None).server_secret == from_text("from the environment")
    # an explicit secret wins over both; without any, every strategy draws fresh bytes
    assert build_strategy(config, model, None, server_secret=b"x" * 32).server_secret == b"x" * 32
    monkeypatch.delenv(SECRET_ENV)
    plain = validate({**DEFAULTS, "server-mask-ratio": 0.5})
    assert build_strategy(plain, model, None).server_secret != (
        build_strategy(plain, model, None).server_secret
    )
    with pytest.raises(ConfigError, match="server-secret-file"):
        build_strategy({**plain, "server-secret-file": str(tmp_path / "missing")}, model, None)


def test_server_mask_comes_from_the_secret_not_the_seed():
    model = build_model("cnn")
    policy = policy_for_model(model)
    kwargs = dict(fraction_evaluate=0.0, privacy_metrics=False)
    one = FedQSN(
        policy,
        server_mask_ratio=0.5,
        client_mask_ratio=0.1,
        seed=3,
        server_secret=from_text("s"),
        **kwargs,
    )
    same = FedQSN(
        policy,
        server_mask_ratio=0.5,
        client_mask_ratio=0.1,
        seed=99,
        server_secret=from_text("s"),
        **kwargs,
    )
    other = FedQSN(
        policy,
        server_mask_ratio=0.5,
        client_mask_ratio=0.1,
        seed=3,
        server_secret=from_text("t"),
        **kwargs,
    )
    fresh = FedQSN(policy, server_mask_ratio=0.5, client_mask_ratio=0.1, seed=3, **kwargs)
    masks = [one, same, other, fresh]
    equal = [
        all(torch.equal(a.server_mask[n], b.server_mask[n]) for n in a.server_mask)
        for a, b in [(one, same), (one, other), (one, fresh)]
    ]
    assert equal == [True, False, False]
    # the client masks too: same secret, same masks, whatever the public seed
    assert all(
        torch.equal(one.client_mask(2, 1)[n], same.client_mask(2, 1)[n]) for n in one.server_mask
    )
    seed_mask = draw_server_mask(policy, 0.5, 3)  # what a client could compute
    assert not any(
        all(torch.equal(seed_mask[n], s.server_mask[n]) for n in seed_mask) for s in masks
    )


def test_the_servers_rows_come_from_the_secret_and_clients_get_only_theirs():
    key = DataKey("digits")
    a = load_server_data(
        key, seed=5, test_fraction=0.2, pretrain_fraction=0.1, secret=from_text("a")
    )
    b = load_server_data(
        key, seed=5, test_fraction=0.2, pretrain_fraction=0.1, secret=from_text("b")
    )
    assert len(a.test) == len(b.test) and len(a.pretrain) == len(b.pretrain)
    # another secret, other server rows (and so another pool), under the same public seed
    server_a = set(range(1797)) - set(a.pool_rows.tolist())
    server_b = set(range(1797)) - set(b.pool_rows.tolist())
    assert len(server_a) == len(server_b) == len(a.test) + len(a.pretrain)
    assert len(server_a & server_b) < 0.5 * len(server_a)  # about 28% by chance
    # and nothing a client can compute gives the pool: it must be told its rows
    with pytest.raises(ValueError, match="no public pool"):
        load_pool(key, 5, 0)
    cut = partition_rows(
        a, secret=from_text("a"), seed=5, num_partitions=4, partitioning="iid", alpha=0.5
    )
    assert sorted(np.concatenate(cut).tolist()) == sorted(a.pool_rows.tolist())


def test_hidden_feedback_is_refused_without_a_server_mask():
    with pytest.raises(ConfigError, match="hidden-feedback"):
        validate({**DEFAULTS, "strategy": "fedq", "hidden-feedback": True})
    config = validate({**DEFAULTS, "hidden-feedback": True})
    with pytest.raises(ValueError, match="feedback_gradient_fn.*feedback_loss_fn"):
        build_strategy(config, build_model("cnn"), None)


@pytest.mark.slow
@pytest.mark.xdist_group("saved_run")  # one worker builds the shared run
def test_a_client_with_everything_it_receives_cannot_rebuild_the_server_mask(saved_run):
    """A real simulation; the "client" holds the run config, node config and every message."""
    run = saved_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    secret = (run / SECRET_FILE).read_bytes()
    received = load_saved_messages(run)
    assert received and config["server-secret-file"] == ""
    # the secret is in no message a client received (raw bytes, as sent)
    files = list((run / "received").rglob("*.pb"))
    assert files
    for file in files:
        data = file.read_bytes()
        assert secret not in data and secret.hex().encode() not in data
    model = build_model(config["model"], config["dropout"], seed=config["seed"])
    policy = policy_for_model(model)
    seen: dict[str, set[int]] = {}
    for content in received.values():
        proxy = received_model(content)
        for name, units in proxy.visible.items():
            seen.setdefault(name, set()).update(units.tolist())
    # every unit a client saw is server-visible; a seed-derived mask hides some of them
    guess = draw_server_mask(policy, config["server-mask-ratio"], config["seed"])
    hidden_by_guess_but_seen = sum(len(seen[n] - set(guess[n].tolist())) for n in guess)
    assert hidden_by_guess_but_seen > 0
    # and the server's starting model is not the public (seed) initialisation
    final = torch.load(run / "final_model.pt", weights_only=True)
    public = model.state_dict()
    assert not torch.equal(final["fc1.weight"], public["fc1.weight"])
    # the strategy rebuilt with the run's secret has exactly the masks the clients saw
    strategy = FedQSN(
        policy,
        server_mask_ratio=config["server-mask-ratio"],
        client_mask_ratio=0.1,
        server_secret=secret,
    )
    for name, units in seen.items():
        assert units <= set(strategy.server_mask[name].tolist())


def test_restoring_under_another_secret_is_refused_and_exposure_is_opt_in(base_config):
    """A new server mask on resume would show clients units hidden so far."""
    from flwr.app import ArrayRecord, ConfigRecord

    from tests.helpers import LocalGrid

    model = build_model("cnn")
    policy = policy_for_model(model)
    options = {"min_train_nodes": 2, "min_available_nodes": 2, "fraction_evaluate": 0.0}
    strategy = FedQSN(policy, server_secret=from_text("a"), **options)
    strategy.configure_train(
        1, ArrayRecord(model.state_dict()), ConfigRecord(), LocalGrid(2, base_config)
    )
    state = strategy.checkpoint_state()
    assert "exposure_seen" not in state  # privacy bookkeeping is off by default
    with pytest.raises(ValueError, match="another server secret"):
        FedQSN(policy, server_secret=from_text("b"), **options).restore(state)
    same = FedQSN(policy, server_secret=from_text("a"), **options)
    same.restore(state)
    assert same.resumption.completed == 0
    tracked = FedQSN(policy, server_secret=from_text("a"), privacy_metrics=True, **options)
    tracked.configure_train(
        1, ArrayRecord(model.state_dict()), ConfigRecord(), LocalGrid(2, base_config)
    )
    assert "exposure_seen" in tracked.checkpoint_state()
