"""`flwr run . --stream` as a user types it: managed local SuperLink, simulation runtime."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedqsn_flwr.app.results import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SUPERLINK_PORT = 39091


def _port_busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _listening_pids(port: int) -> list[int]:
    out = subprocess.run(
        ["lsof", "-t", f"-iTCP:{port}", "-sTCP:LISTEN"], capture_output=True, text=True
    ).stdout
    return [int(pid) for pid in out.split()]


def _flwr_run(flwr, app, env, run_config, nodes):
    """``flwr run <app> --stream``; its output and the run's final status."""
    command = [flwr, "run", str(app), "--stream"]
    if run_config:
        command += ["--run-config", run_config]
    command += ["--federation-config", f"num-supernodes={nodes} client-resources-num-cpus=1"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    match = re.search(r"Successfully started run (\d+)", output)
    assert match, output[-3000:]
    listed = subprocess.run(
        [flwr, "list", "local", "--run-id", match.group(1), "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return output, json.loads(listed.stdout)["runs"][0]["status"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("lsof") is None, reason="needs lsof to stop the SuperLink")
def test_flwr_run_stream_runs_this_app_and_the_own_app_example(tmp_path):
    """``flwr run .`` and ``flwr run examples/own-app`` on one managed local SuperLink."""
    if _port_busy(LOCAL_SUPERLINK_PORT):
        pytest.skip("a local SuperLink is already running on 127.0.0.1:39091; not touching it")
    flwr = str(Path(sys.executable).with_name("flwr"))
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    run_config = (
        f"num-server-rounds=2 pretrain-epochs=5 output-dir='{tmp_path}' "
        "run-name='via-flwr-run' min-nodes=3"
    )
    try:
        output, status = _flwr_run(flwr, ".", env, run_config, nodes=3)
        assert status == "finished:completed", output[-3000:]
        assert "Results written to" in output
        rows = read_metrics(tmp_path / "via-flwr-run" / "metrics.csv")
        assert [int(r["round"]) for r in rows] == [0, 1, 2]

        # the README's own-app example, as a user runs it: standard handlers,
        # Flower's default evaluation, its own model, data and metric names
        output, status = _flwr_run(flwr, ROOT / "examples" / "own-app", env, "", nodes=4)
        assert status == "finished:completed", output[-3000:]
        accuracy = [float(a) for a in re.findall(r"global accuracy ([0-9.]+)", output)]
        assert len(accuracy) == 6 and accuracy[-1] > 0.8, output[-3000:]
        assert "eval_acc" in output and "rejected reply" not in output
        # a standard app (no @app.query handler) runs without a single traceback
        assert "Traceback" not in output and "No query function" not in output, output[-3000:]
        assert output.count("Partition ids:") <= 1
    finally:
        for pid in _listening_pids(LOCAL_SUPERLINK_PORT):
            os.kill(pid, 15)
