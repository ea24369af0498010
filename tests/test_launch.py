"""A real multi-process federation: SuperLink + 3 SuperNodes on loopback."""

import os
import subprocess
from pathlib import Path

from fedqsn_flwr.launch import LocalFederation, _with_min_nodes, submit
from fedqsn_flwr.results import read_metrics

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


def test_launcher_runs_fedqsn_across_processes_and_leaves_nothing_behind(tmp_path):
    federation = LocalFederation(nodes=3, workdir=tmp_path / "fed")
    run_config = _with_min_nodes(
        f"num-server-rounds=2 pretrain-epochs=5 output-dir='{tmp_path}' run-name='deployed'", 3
    )
    try:
        federation.start()
        pids = federation.pids
        assert len(pids) == 4 and all(_alive(pid) for pid in pids)
        outcome = submit(federation, ROOT, run_config, timeout=400)
    finally:
        federation.stop()
    assert outcome.completed, outcome.output[-3000:]
    rows = read_metrics(tmp_path / "deployed" / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(r["num_aggregated"] == 3 for r in rows[1:])
    assert not any(_alive(pid) for pid in pids)
    assert not any(_session_members(pid) for pid in pids)  # no ServerApp/ClientApp left


def test_min_nodes_is_added_unless_given():
    assert _with_min_nodes("seed=1", 4) == "seed=1 min-nodes=4"
    assert _with_min_nodes("min-nodes=2 seed=1", 4) == "min-nodes=2 seed=1"
