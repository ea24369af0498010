"""Run a federation as real processes on this machine: one SuperLink, N SuperNodes.

    python -m fedqsn_flwr.launch --nodes 3 --run-config "num-server-rounds=2"

Starts ``flower-superlink`` and ``flower-supernode`` processes on loopback (free
ports), submits the app in the current directory with ``flwr run . --stream``,
waits for it, reads the run's real final status (``flwr run --stream`` exits 0
even when the ServerApp failed), and stops every process it started --
SuperNodes first, then the SuperLink -- also when interrupted or when the run
fails. Exit status: 0 when the run finished as ``completed``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CONNECTION = "fedqsn-launch"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tool(name: str) -> str:
    """A Flower command from this interpreter's environment (or PATH)."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' not found; install the project (scripts/setup)")
    return found


@dataclass
class LocalFederation:
    """The processes of one local federation and where their logs go."""

    nodes: int
    workdir: Path
    superlink_port: int = field(default_factory=free_port)
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the ``flwr`` commands (holds the connection)."""
        return self.workdir / "flwr-home"

    @property
    def env(self) -> dict[str, str]:
        """Environment for every process: isolated FLWR_HOME, no downloads."""
        return {
            **os.environ,
            "FLWR_HOME": str(self.flwr_home),
            # Offline unless asked (HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 lets
            # flwr-datasets download mnist, cifar10, ag-news, ...).
            "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    @property
    def pids(self) -> list[int]:
        """Process ids of everything started (SuperLink first)."""
        return [p.pid for _, p in self.processes]

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        # a session of its own, so stopping it also stops the app processes it spawns
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.processes.append((name, process))
        return process

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, wait until it listens, then start the SuperNodes."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n'
        )
        superlink = self._spawn(
            "superlink",
            [
                _tool("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.superlink_port),
            ],
        )
        deadline = time.monotonic() + timeout
        while not _listening(self.superlink_port):
            if superlink.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SuperLink did not start; see {self.workdir / 'superlink.log'}")
            time.sleep(0.2)
        for partition in range(self.nodes):
            self._spawn(
                f"supernode-{partition}",
                [
                    _tool("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.superlink_port}",
                    "--node-config",
                    f"partition-id={partition} num-partitions={self.nodes}",
                    "--port",
                    str(free_port()),
                ],
            )

    def stop(self, grace: float = 10.0) -> None:
        """Stop SuperNodes first (else they retry forever), then the SuperLink."""
        for _, process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@dataclass(frozen=True)
class RunOutcome:
    """What a submitted run ended as."""

    run_id: str | None
    status: str
    output: str
    seconds: float

    @property
    def completed(self) -> bool:
        """True when Flower reports the run as finished and completed."""
        return self.status == "finished:completed"


def submit(
    federation: LocalFederation, project: Path, run_config: str, timeout: float
) -> RunOutcome:
    """``flwr run <project> --stream``, then ask the SuperLink for the run's status."""
    flwr = _tool("flwr")
    command = [flwr, "run", str(project), CONNECTION, "--stream"]
    if run_config:
        command += ["--run-config", run_config]
    start = time.monotonic()
    done = subprocess.run(
        command, env=federation.env, capture_output=True, text=True, timeout=timeout, cwd=project
    )
    output = done.stdout + done.stderr
    match = re.search(r"Successfully started run (\d+)", output)
    if match is None:
        return RunOutcome(None, "not started", output, time.monotonic() - start)
    listed = subprocess.run(
        [flwr, "list", CONNECTION, "--run-id", match.group(1), "--format", "json"],
        env=federation.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=project,
    )
    try:
        status = json.loads(listed.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError):
        status = f"unknown ({listed.stdout.strip() or listed.stderr.strip()})"
    return RunOutcome(match.group(1), status, output, time.monotonic() - start)


def _with_min_nodes(run_config: str, nodes: int) -> str:
    """Make the server wait for all nodes unless the user said otherwise."""
    if re.search(r"(^|\s)min-nodes\s*=", run_config):
        return run_config
    return f"{run_config} min-nodes={nodes}".strip()


def _interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt, so it cleans up like Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fedqsn_flwr.launch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes to start")
    parser.add_argument("--run-config", default="", help='as for flwr run: "k=v k2=v2"')
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="the Flower app")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the run")
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="keep the processes' logs here (default: a temporary folder)",
    )
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")

    workdir = args.logs or Path(tempfile.mkdtemp(prefix="fedqsn-launch-"))
    workdir.mkdir(parents=True, exist_ok=True)
    federation = LocalFederation(nodes=args.nodes, workdir=workdir)
    signal.signal(signal.SIGTERM, _interrupt)
    outcome: RunOutcome | None = None
    try:
        federation.start()
        print(
            f"SuperLink on 127.0.0.1:{federation.superlink_port}, {args.nodes} SuperNodes "
            f"(pids {federation.pids}); logs in {workdir}",
            flush=True,
        )
        outcome = submit(
            federation,
            args.project.resolve(),
            _with_min_nodes(args.run_config, args.nodes),
            args.timeout,
        )
        print(outcome.output, flush=True)
    except KeyboardInterrupt:
        print("interrupted: stopping the federation", file=sys.stderr, flush=True)
    except (RuntimeError, subprocess.TimeoutExpired, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
    finally:
        federation.stop()
    if outcome is None:
        return 1
    print(
        f"run {outcome.run_id}: {outcome.status} in {outcome.seconds:.1f} s; "
        f"stopped pids {federation.pids}",
        flush=True,
    )
    return 0 if outcome.completed else 1


if __name__ == "__main__":
    sys.exit(main())
