"""Run a federation as real processes on this machine: one SuperLink, N SuperNodes.

    python -m fedqsn_flwr.experiments.launch --nodes 3 --run-config "num-server-rounds=2"

Starts ``flower-superlink`` and ``flower-supernode`` processes on loopback (free
ports), submits the app in the current directory with ``flwr run . --stream``,
(with ``--tls``: over TLS with a throw-away CA, and with SuperNode
authentication: every node's key is created and registered for the run),
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


@dataclass(frozen=True)
class Credentials:
    """A throw-away CA, the SuperLink's certificate and one key pair per SuperNode."""

    folder: Path

    @property
    def ca(self) -> Path:
        """The CA certificate (PEM) every party trusts."""
        return self.folder / "ca.crt"

    @property
    def server_certificate(self) -> Path:
        """The SuperLink's certificate, for ``IP:127.0.0.1``."""
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        """The SuperLink's private key."""
        return self.folder / "server.key"

    def node_key(self, name: str) -> Path:
        """A SuperNode's private key (OpenSSH ECDSA); ``.pub`` beside it."""
        return self.folder / name


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_credentials(folder: Path, node_names: Sequence[str]) -> Credentials:
    """Create a CA, a certificate for 127.0.0.1 signed by it, and ECDSA node keys.

    With the ``cryptography`` package Flower itself depends on; keys are
    written readable by their owner only, and live as long as ``folder``.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: object, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA384())  # type: ignore[arg-type]

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    credentials = Credentials(folder)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedqsn-launch CA")])
    ca_cert = certificate("fedqsn-launch CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    credentials.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    credentials.server_certificate.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(credentials.server_key, pem_key(server_key))
    for name in node_names:
        write_node_key(credentials.node_key(name))
    return credentials


def write_node_key(path: Path) -> Path:
    """A SuperNode key pair: ECDSA P-384 in OpenSSH format at ``path`` and ``path.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    _write_private(path, private)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_suffix(".pub").write_bytes(public + b"\n")
    return path


@dataclass
class LocalFederation:
    """The processes of one local federation and where their logs go.

    With ``tls``, the SuperLink serves TLS with a throw-away CA
    (:func:`make_credentials`) and requires SuperNode authentication; every
    SuperNode's key is registered before it starts.
    """

    nodes: int
    workdir: Path
    superlink_port: int = field(default_factory=free_port)
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    tls: bool = False

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

    @property
    def credentials(self) -> Credentials:
        """Where the TLS material and node keys of this federation live."""
        return Credentials(self.workdir / "credentials")

    def _security(self) -> tuple[str, list[str]]:
        """The connection's security line and the SuperLink's security flags."""
        if not self.tls:
            return "insecure = true", ["--insecure"]
        names = [f"supernode-{i}" for i in range(self.nodes)]
        credentials = make_credentials(self.credentials.folder, names)
        return f'root-certificates = "{credentials.ca}"', [
            "--ssl-ca-certfile",
            str(credentials.ca),
            "--ssl-certfile",
            str(credentials.server_certificate),
            "--ssl-keyfile",
            str(credentials.server_key),
            "--enable-supernode-auth",
        ]

    def supernode_command(self, partition: int, key: Path | None = None) -> list[str]:
        """The command of one SuperNode (with ``tls``: authenticated with ``key``)."""
        command = [_tool("flower-supernode")]
        if self.tls:
            key = key or self.credentials.node_key(f"supernode-{partition}")
            command += [
                "--root-certificates",
                str(self.credentials.ca),
                "--auth-supernode-private-key",
                str(key),
            ]
        else:
            command += ["--insecure"]
        return command + [
            "--superlink",
            f"127.0.0.1:{self.superlink_port}",
            "--node-config",
            f"partition-id={partition} num-partitions={self.nodes}",
            "--port",
            str(free_port()),
        ]

    def register(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``)."""
        done = subprocess.run(
            [_tool("flwr"), "supernode", "register", str(public_key), CONNECTION],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"could not register {public_key.name}: {(done.stdout + done.stderr).strip()}"
            )

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, wait until it listens, then start the SuperNodes."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        connection, flags = self._security()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\n{connection}\n'
        )
        superlink = self._spawn(
            "superlink",
            [
                _tool("flower-superlink"),
                *flags,
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
            if self.tls:
                self.register(
                    self.credentials.node_key(f"supernode-{partition}").with_suffix(".pub")
                )
            self._spawn(f"supernode-{partition}", self.supernode_command(partition))

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
            _wait_group_gone(process.pid, grace)


def _wait_group_gone(pgid: int, grace: float) -> None:
    """Wait until no process of group ``pgid`` is left (the apps a node or link spawned).

    The group leader can exit while a ServerApp or ClientApp it started is still
    shutting down; those get ``grace`` seconds, then SIGKILL.
    """
    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # pragma: no cover - a reused id of another user's group
            return
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.2)
            return
        time.sleep(0.1)


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
        prog="python -m fedqsn_flwr.experiments.launch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes to start")
    parser.add_argument("--run-config", default="", help='as for flwr run: "k=v k2=v2"')
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="the Flower app")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the run")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="TLS with a throw-away CA and SuperNode authentication (keys made and registered)",
    )
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
    federation = LocalFederation(nodes=args.nodes, workdir=workdir, tls=args.tls)
    signal.signal(signal.SIGTERM, _interrupt)
    outcome: RunOutcome | None = None
    try:
        federation.start()
        security = "TLS + SuperNode authentication" if args.tls else "insecure, loopback only"
        print(
            f"SuperLink on 127.0.0.1:{federation.superlink_port} ({security}), {args.nodes} "
            f"SuperNodes (pids {federation.pids}); logs in {workdir}",
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
