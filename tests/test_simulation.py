"""End-to-end runs in Flower's simulation engine (real ServerApp, ClientApp, Ray)."""

import csv
import math

import pytest
import torch

from fedqsn_flwr.app.results import METRIC_COLUMNS, read_metrics
from fedqsn_flwr.experiments.simulation import simulate as run_federation

# the module's fixture runs once per worker: keep its tests on one (pytest-xdist)
pytestmark = pytest.mark.xdist_group("scratch_runs")

# every measured column but sizes and times
ACCURACY_COLUMNS = [c for c in METRIC_COLUMNS if not c.startswith("bytes") and "seconds" not in c]


def simulate(tmp_path, name, num_nodes=4, **overrides):
    config = {"output-dir": str(tmp_path), "run-name": name, "min-nodes": num_nodes, **overrides}
    return run_federation(config, num_nodes=num_nodes)


@pytest.fixture(scope="module")
def scratch_runs(tmp_path_factory):
    """The same from-scratch FedQSN federation twice (Flower draws new node ids each time)."""
    tmp = tmp_path_factory.mktemp("sim")
    secret = tmp / "server.secret"
    secret.write_text("simulation tests")
    settings = {
        "pretrain-epochs": 0,
        "num-server-rounds": 3,
        "seed": 5,
        "fraction-evaluate": 0.5,
        "server-secret-file": str(secret),
    }
    return [simulate(tmp, f"run{i}", **settings) for i in range(2)]


@pytest.mark.slow
def test_fedqsn_from_scratch_learns_and_writes_every_round(scratch_runs):
    run = scratch_runs[0]
    for file in ("config.yaml", "metrics.csv", "messages.csv", "final_model.pt"):
        assert (run / file).exists(), file
    rows = read_metrics(run / "metrics.csv")
    assert list(rows[0]) == list(METRIC_COLUMNS)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert rows[0]["global_accuracy"] < 0.3  # random start, 10 classes
    assert rows[-1]["global_accuracy"] > 0.7  # well above chance after 3 rounds
    for row in rows[1:]:
        assert row["num_sampled"] == 4 and row["num_failures"] == 0
        assert 0 < row["bytes_down"] and 0 < row["bytes_up"]
        assert not math.isnan(row["proxy_accuracy"]) and not math.isnan(row["client_eval_accuracy"])
    with (run / "messages.csv").open() as handle:
        messages = list(csv.DictReader(handle))
    train_down = [m for m in messages if m["message_type"] == "train" and m["direction"] == "down"]
    assert len(train_down) == 12
    assert sorted({int(m["partition_id"]) for m in train_down}) == [0, 1, 2, 3]
    final = torch.load(run / "final_model.pt")
    assert set(final) >= {"conv1.weight", "fc2.bias"} and final["fc1.weight"].dtype == torch.float32


@pytest.mark.slow
def test_same_seed_and_secret_give_the_same_results_across_real_simulations(scratch_runs):
    first, second = (read_metrics(run / "metrics.csv") for run in scratch_runs)
    for a, b in zip(first, second, strict=True):
        for column in ACCURACY_COLUMNS:
            assert a[column] == b[column] or (math.isnan(a[column]) and math.isnan(b[column])), (
                column
            )
        # message metadata (random node ids) may change a serialized size by a few bytes
        assert a["bytes_down"] == pytest.approx(b["bytes_down"], rel=1e-3, nan_ok=True)
    final = [torch.load(run / "final_model.pt") for run in scratch_runs]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_invalid_config_stops_the_run_before_training(tmp_path):
    with pytest.raises(Exception, match="bit-width"):
        simulate(tmp_path, "bad", num_nodes=2, **{"bit-width": 12})
    assert not (tmp_path / "bad").exists()
