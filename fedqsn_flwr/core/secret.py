"""The server secret: what no client can obtain, and every seed clients must not predict.

Flower hands the whole run config to every ClientApp, so nothing a client must
not predict may derive from the run's ``seed``: not the server mask, not the
client masks, not the server's initialisation, pretraining order or the split
of public data into its test and pretraining sets. Those derive from a
*server secret* of 32 bytes, through :func:`secret_seed`.

Where the secret comes from (:func:`resolve_secret`, first match wins):

1. the environment variable ``FEDQSN_SERVER_SECRET`` of the ServerApp's process
   (any text; hashed with SHA-256);
2. the run-config key ``server-secret-file``: a file the ServerApp reads (its
   bytes are hashed with SHA-256). Clients see the *path* in the run config,
   never the content; on a real deployment keep the file on the SuperLink's
   machine only. In a simulation every process runs on one machine, so this
   (like the environment variable) is for reproducible research, not for
   secrecy against the machine's own users;
3. the run folder's ``server-secret`` file, when a run resumes;
4. otherwise fresh random bytes (``os.urandom``): the default.

Whatever its source, the secret is written to the run folder (``server-secret``,
mode 0600) so that a resumed run continues exactly, and never into a message,
a log line or the run config.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Environment variable of the ServerApp's process holding the secret (opt-in).
SECRET_ENV = "FEDQSN_SERVER_SECRET"
#: File in the run folder that keeps the secret for a resumed run.
SECRET_FILE = "server-secret"
SECRET_BYTES = 32


class SecretError(ValueError):
    """A server secret that cannot be used (the message says why)."""


def from_text(text: str | bytes) -> bytes:
    """A 32-byte secret from any text or bytes (SHA-256)."""
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(b"fedqsn-server-secret\0" + data).digest()


def new_secret() -> bytes:
    """Fresh random bytes: the default secret of a run."""
    return os.urandom(SECRET_BYTES)


def secret_seed(secret: bytes, purpose: str, *keys: int) -> int:
    """A 63-bit seed for ``purpose`` (and integer ``keys``) keyed by ``secret``.

    BLAKE2b keyed with the secret over the purpose and the keys, each with its
    length, so no two (purpose, keys) share a seed and nothing about the seed can
    be computed without the secret.
    """
    if len(secret) != SECRET_BYTES:
        raise SecretError(f"a server secret has {SECRET_BYTES} bytes, got {len(secret)}")
    name = purpose.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(keys))
    for key in keys:
        # 64-bit unsigned: Flower's node ids (a node's fallback partition id) use it all
        if not 0 <= int(key) < 2**64:
            raise SecretError(f"secret_seed keys are 0..2**64-1, got {key}")
        data += struct.pack(">Q", int(key))
    digest = hashlib.blake2b(data, key=secret, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def secret_digest(secret: bytes) -> str:
    """A fingerprint of ``secret`` for server-side checkpoints (tells secrets apart only).

    Keyed BLAKE2b of a fixed label: it reveals nothing usable about the secret,
    and no seed :func:`secret_seed` derives equals it.
    """
    return hashlib.blake2b(b"checkpoint-digest", key=secret, digest_size=16).hexdigest()


def read_secret_file(path: str | Path) -> bytes:
    """The secret a ``server-secret-file`` names (its bytes, hashed)."""
    file = Path(path).expanduser()
    try:
        data = file.read_bytes()
    except OSError as err:
        raise SecretError(f"config key 'server-secret-file': cannot read '{file}': {err}") from err
    if not data.strip():
        raise SecretError(f"config key 'server-secret-file': '{file}' is empty")
    return from_text(data)


def _stored(run_dir: Path) -> bytes | None:
    file = run_dir / SECRET_FILE
    if not file.exists():
        return None
    data = file.read_bytes()
    if len(data) != SECRET_BYTES:
        raise SecretError(f"{file} does not hold a {SECRET_BYTES}-byte server secret")
    return data


def store_secret(run_dir: Path, secret: bytes) -> None:
    """Write the secret to the run folder, readable by its owner only."""
    file = run_dir / SECRET_FILE
    tmp = file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    os.replace(tmp, file)


def resolve_secret(
    config: Mapping[str, Any],
    run_dir: Path,
    resuming: bool,
    environ: Mapping[str, str] | None = None,
) -> tuple[bytes, str]:
    """The run's secret and where it came from (see the module docstring).

    A resumed run keeps the secret it started with; an explicit secret that
    differs from it is refused rather than silently mixing two.
    """
    environ = os.environ if environ is None else environ
    explicit: tuple[bytes, str] | None = None
    if environ.get(SECRET_ENV):
        explicit = from_text(environ[SECRET_ENV]), f"environment variable {SECRET_ENV}"
    elif config.get("server-secret-file"):
        explicit = read_secret_file(config["server-secret-file"]), "server-secret-file"
    stored = _stored(run_dir) if resuming else None
    if stored is not None:
        if explicit is not None and explicit[0] != stored:
            raise SecretError(
                f"the run folder {run_dir} was started with another server secret than the "
                f"one from the {explicit[1]}; use another run-name or the same secret"
            )
        return stored, "the run folder (resumed run)"
    if explicit is not None:
        return explicit
    return new_secret(), "fresh random bytes"
