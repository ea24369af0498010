"""A real multi-process federation: SuperLink + 3 SuperNodes on loopback."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fedqsn_flwr.app.results import read_metrics
from fedqsn_flwr.experiments.launch import (
    LocalFederation,
    _tool,
    _with_min_nodes,
    free_port,
    submit,
    write_node_key,
)

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _session_members(sid: int) -> list[str]:
    """Live processes of a session (zombies, already dead, waiting for init, don't count)."""
    out = subprocess.run(
        ["ps", "-o", "pid=,stat=", "-s", str(sid)], capture_output=True, text=True
    ).stdout
    return [line.split()[0] for line in out.splitlines() if not line.split()[1].startswith("Z")]


@pytest.mark.slow
def test_launcher_runs_fedqsn_over_tls_with_node_auth_refuses_strangers_and_cleans_up(tmp_path):
    """TLS (throw-away CA) + SuperNode authentication, 3 registered nodes and one stranger."""
    federation = LocalFederation(nodes=3, workdir=tmp_path / "fed", tls=True)
    run_config = _with_min_nodes(
        f"num-server-rounds=1 pretrain-epochs=5 output-dir='{tmp_path}' run-name='deployed'", 3
    )
    try:
        federation.start()
        # a SuperNode with the CA but a key the SuperLink never registered
        stranger_key = write_node_key(federation.credentials.node_key("stranger"))
        federation._spawn("stranger", federation.supernode_command(0, stranger_key))
        pids = federation.pids
        assert len(pids) == 5 and all(_alive(pid) for pid in pids)
        outcome = submit(federation, ROOT, run_config, timeout=400)
    finally:
        federation.stop()
    assert outcome.completed, outcome.output[-3000:]
    rows = read_metrics(tmp_path / "deployed" / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert all(r["num_aggregated"] == 3 for r in rows[1:])  # the stranger never took part
    superlink_log = (tmp_path / "fed" / "superlink.log").read_text()
    assert superlink_log.count("[Fleet.ActivateNode] Activated node_id") == 3
    assert "No SuperNode found with the given public key" in superlink_log
    config = (federation.flwr_home / "config.toml").read_text()
    assert "insecure" not in config and "root-certificates" in config
    assert not any(_alive(pid) for pid in pids)
    assert not any(_session_members(pid) for pid in pids)  # no ServerApp/ClientApp left


def test_min_nodes_is_added_unless_given():
    assert _with_min_nodes("seed=1", 4) == "seed=1 min-nodes=4"
    assert _with_min_nodes("min-nodes=2 seed=1", 4) == "min-nodes=2 seed=1"


@pytest.mark.slow
def test_a_killed_supernode_and_one_without_partition_id_leave_the_run_to_finish(tmp_path):
    """3 SuperNodes and a 4th started without partition-id; one of the 3 is killed.

    min-nodes below the node count lets rounds go on; round-timeout bounds the
    wait for the dead node; the node without a partition-id fails with a clear
    error every round and is skipped.
    """
    federation = LocalFederation(nodes=3, workdir=tmp_path / "fed")
    metrics = tmp_path / "killed" / "metrics.csv"
    run_config = (
        # a generous timeout: round 1 starts a fresh ClientApp process per node, which
        # can take 20 s on a loaded 2-core machine; only round 2 waits for the dead node
        f"num-server-rounds=2 pretrain-epochs=5 min-nodes=2 round-timeout=45 "
        f"fraction-evaluate=0.0 output-dir='{tmp_path}' run-name='killed'"
    )
    outcome = {}
    try:
        federation.start()
        victim = federation.processes[-1][1]
        federation._spawn(
            "no-config",
            [
                _tool("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{federation.superlink_port}",
                "--port",
                str(free_port()),
            ],
        )
        runner = threading.Thread(
            target=lambda: outcome.update(run=submit(federation, ROOT, run_config, 400))
        )
        runner.start()
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(read_metrics(metrics)) >= 2):  # round 1 done
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.5)
        os.killpg(victim.pid, signal.SIGKILL)
        runner.join(timeout=400)
    finally:
        federation.stop()
    assert outcome["run"].completed, outcome["run"].output[-3000:]
    rows = read_metrics(metrics)
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert rows[1]["num_aggregated"] == 3 and rows[1]["num_failures"] == 1
    # the dead node counts as a failure while Flower still lists it as connected
    assert rows[2]["num_aggregated"] == 2 and rows[2]["num_failures"] >= 1
    assert re.search(
        r"node \d+ failed and is skipped: .*node config has no 'partition-id'; "
        r"start the SuperNode with --node-config",
        outcome["run"].output,
    )


def test_partition_id_out_of_range_is_a_clear_error():
    import pytest
    from flwr.app import Context, RecordDict

    from fedqsn_flwr.app.client import NodeConfigError, partition_of

    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 5, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(
        NodeConfigError, match="partition-id 5 is out of range for num-partitions=3"
    ):
        partition_of(context)


@pytest.mark.slow
def test_launcher_stops_everything_when_terminated(tmp_path):
    import sys

    logs = tmp_path / "logs"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedqsn_flwr.experiments.launch",
            "--nodes",
            "2",
            "--logs",
            str(logs),
            "--run-config",
            f"num-server-rounds=50 pretrain-epochs=0 output-dir='{tmp_path}' run-name='long'",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = launcher.stdout.readline()  # "SuperLink on ..., 2 SuperNodes (pids [...]); ..."
    pids = [int(p) for p in re.search(r"pids \[([\d, ]+)\]", first).group(1).split(",")]
    deadline = time.monotonic() + 240
    while not (tmp_path / "long" / "metrics.csv").exists():  # the run is under way
        assert time.monotonic() < deadline
        time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    rest = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 1
    assert "interrupted: stopping the federation" in rest
    assert not any(_alive(pid) for pid in pids)
    assert not any(_session_members(pid) for pid in pids)
