"""Checkpoint after every round; a killed run restarted with the same config resumes."""

import os
from pathlib import Path

import pytest
import torch
from flwr.app import Context, MessageType, RecordDict

from fedqsn_flwr.app import server
from fedqsn_flwr.app.config import validate
from fedqsn_flwr.app.results import RunFolderError, load_checkpoint, read_metrics
from fedqsn_flwr.app.server import run_server
from tests.helpers import LocalGrid


class KilledGrid(LocalGrid):
    """Dies (like a killed server) when round ``kill_round``'s training starts."""

    def __init__(self, *args, kill_round: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kill_round = kill_round

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for message in messages:
            if (
                message.metadata.message_type == MessageType.TRAIN
                and int(message.content["config"]["server-round"]) == self.kill_round
            ):
                raise KeyboardInterrupt("server killed")
        return super().send_and_receive(messages, timeout)


@pytest.fixture(autouse=True)
def one_thread():
    """LocalGrid runs the client handlers in this process, and they set one torch
    thread; the reference run must use the same, as float reductions depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(base_config, name, **extra):
    # one server secret for every run of a test: the runs compare bit for bit
    secret = Path(base_config["output-dir"]) / "server.secret"
    if not secret.exists():
        secret.write_text("resume tests")
    return validate(
        {
            **base_config,
            "server-secret-file": str(secret),
            "run-name": name,
            "num-server-rounds": 4,
            "min-nodes": 3,
            "fraction-evaluate": 0.5,
            "server-mask-ratio": 0.3,
            **extra,
        }
    )


def test_a_killed_run_resumes_and_ends_exactly_like_an_uninterrupted_one(base_config, tmp_path):
    full = run_server(LocalGrid(3, _config(base_config, "full")), _config(base_config, "full"))

    config = _config(base_config, "killed")
    with pytest.raises(KeyboardInterrupt):
        run_server(KilledGrid(3, config, kill_round=3), config)
    folder = tmp_path / "killed"
    assert [int(r["round"]) for r in read_metrics(folder / "metrics.csv")] == [0, 1, 2]
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["round"] == 2
    assert not (folder / "final_model.pt").exists()

    resumed = run_server(LocalGrid(3, config), config)
    a = torch.load(full.directory / "final_model.pt")
    b = torch.load(resumed.directory / "final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_full = read_metrics(full.directory / "metrics.csv")
    rows_resumed = read_metrics(resumed.directory / "metrics.csv")
    assert [int(r["round"]) for r in rows_resumed] == [0, 1, 2, 3, 4]
    for x, y in zip(rows_full, rows_resumed, strict=True):
        for column, value in x.items():
            if column != "elapsed_seconds":
                assert value == y[column] or (value != value and y[column] != y[column]), column
    assert (resumed.directory / "messages.csv").read_text() == (
        full.directory / "messages.csv"
    ).read_text()


class RestartedGrid(LocalGrid):
    """The same partitions under new node ids, as after a restart of every SuperNode."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = {
            node_id + 12345: Context(
                run_id=c.run_id,
                node_id=node_id + 12345,
                node_config=dict(c.node_config),
                state=RecordDict(),
                run_config={},
            )
            for node_id, c in self.contexts.items()
        }


def test_a_resumed_run_accepts_its_partitions_under_new_node_ids(base_config):
    """Restored partition owners that are gone do not lock their partitions."""
    full = run_server(LocalGrid(3, _config(base_config, "full")), _config(base_config, "full"))
    config = _config(base_config, "restarted")
    with pytest.raises(KeyboardInterrupt):
        run_server(KilledGrid(3, config, kill_round=3), config)
    resumed = run_server(RestartedGrid(3, config), config)
    rows = read_metrics(resumed.directory / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["num_aggregated"] == 3 for r in rows[1:])
    # masks, sampling and aggregation order follow partitions: the same model
    a = torch.load(full.directory / "final_model.pt")
    b = torch.load(resumed.directory / "final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_another_config_is_refused(base_config):
    config = _config(base_config, "first")
    with pytest.raises(KeyboardInterrupt):
        run_server(KilledGrid(3, config, kill_round=2), config)
    changed = {**config, "bit-width": 3}
    with pytest.raises(ValueError, match="another configuration.*bit-width"):
        run_server(LocalGrid(3, changed), changed)


def test_a_kill_in_round_one_resumes_without_pretraining_or_a_second_round_zero(
    base_config, monkeypatch
):
    config = _config(base_config, "early", **{"pretrain-cache": False, "num-server-rounds": 2})
    calls = []
    real_train = server.train
    monkeypatch.setattr(server, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        run_server(KilledGrid(3, config, kill_round=1), config)
    assert len(calls) == 1  # pretrained once
    resumed = run_server(LocalGrid(3, config), config)
    assert len(calls) == 1  # the checkpoint holds the weights: no second pretraining
    rounds = [int(r["round"]) for r in read_metrics(resumed.directory / "metrics.csv")]
    assert rounds == [0, 1, 2]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_a_crafted_or_broken_checkpoint_is_refused_before_training(base_config, tmp_path):
    config = _config(base_config, "bad", **{"num-server-rounds": 2})
    folder = tmp_path / "bad"
    with pytest.raises(KeyboardInterrupt):
        run_server(KilledGrid(3, config, kill_round=2), config)
    checkpoint = folder / "checkpoint.pt"
    good = checkpoint.read_bytes()
    # a pickle that would run a command when unpickled without weights_only
    torch.save({"round": 1, "global": {}, "strategy": {}, "x": _RunsCode()}, checkpoint)
    with pytest.raises(RunFolderError, match="checkpoint.pt"):
        load_checkpoint(checkpoint)
    assert not (Path.cwd() / "pwned-by-checkpoint").exists()
    with pytest.raises(RunFolderError, match="checkpoint.pt"):
        run_server(LocalGrid(3, config), config)
    checkpoint.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(RunFolderError, match="checkpoint.pt"):
        run_server(LocalGrid(3, config), config)
    checkpoint.write_bytes(good)
    (folder / "metrics.csv").unlink()
    with pytest.raises(RunFolderError, match="metrics.csv"):
        run_server(LocalGrid(3, config), config)
    (folder / "config.yaml").unlink()
    with pytest.raises(RunFolderError, match="config.yaml"):
        run_server(LocalGrid(3, config), config)


def test_an_unwritable_output_dir_fails_naming_the_key(base_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = _config(base_config, "x", **{"output-dir": str(blocker / "sub")})
    with pytest.raises(RunFolderError, match="output-dir"):
        run_server(LocalGrid(3, config), config)
