"""The server secret: what no client can obtain, and every seed clients must not predict.

Flower hands the whole run config to every ClientApp, so nothing a client must
not predict may derive from the run's ``seed``: not the server mask, not the
client masks, not the server's initialisation, pretraining order or the split
of public data into its test and pretraining sets. Those derive from a
*server secret* of 32 bytes. Every such draw comes from a generator whose whole
state derives from the secret (:func:`secret_rng` for numpy,
:func:`secret_torch_generator` and :func:`torch_rng_from_secret` for torch),
never from an integer seed: ``torch.manual_seed`` and ``Generator.manual_seed``
keep 32 bits of any seed, and a client can search 2**32 seeds in minutes.

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

Public seeds, which clients may compute (node sampling, a client's batch order
and dropout, the attack tool's draws), come from :func:`derive_seed` of the
run's ``seed``: the one helper for both kinds of seed lives here, so that a
draw's choice between them is made in one place.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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


def _keyed(secret: bytes, purpose: str, keys: tuple[int, ...], size: int) -> bytes:
    """Keyed BLAKE2b over the purpose and the keys, each with its length (injective)."""
    if len(secret) != SECRET_BYTES:
        raise SecretError(f"a server secret has {SECRET_BYTES} bytes, got {len(secret)}")
    name = purpose.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(keys))
    for key in keys:
        # 64-bit unsigned: Flower's node ids (a node's fallback partition id) use it all
        if not 0 <= int(key) < 2**64:
            raise SecretError(f"secret draw keys are 0..2**64-1, got {key}")
        data += struct.pack(">Q", int(key))
    return hashlib.blake2b(data, key=secret, digest_size=size).digest()


def secret_entropy(secret: bytes, purpose: str, *keys: int) -> int:
    """A 256-bit integer for ``purpose`` (and integer ``keys``) keyed by ``secret``.

    No two (purpose, keys) share it, and nothing about it can be computed
    without the secret. It is entropy for :class:`numpy.random.SeedSequence`,
    never a seed for a generator that keeps fewer bits (``torch.manual_seed``,
    ``Generator.manual_seed``, ``np.random.seed``, ``random.seed`` keep 32 to
    64): use :func:`secret_rng`, :func:`secret_torch_generator` or
    :func:`torch_rng_from_secret`.
    """
    return int.from_bytes(_keyed(secret, purpose, keys, SECRET_BYTES), "big")


def secret_rng(secret: bytes, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy generator for ``purpose`` whose whole state derives from the secret.

    PCG64 (128-bit state and 128-bit increment) filled by a ``SeedSequence``
    of the 256-bit :func:`secret_entropy`. Same secret, purpose and keys: the
    same draws.
    """
    entropy = secret_entropy(secret, purpose, *keys)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


# torch's CPU generator state (CPUGeneratorImplState): initial seed (u64), left
# (i32), seeded (i32), next (u64), then MT19937's 624 words, each in a u64 slot,
# then the normal-sample cache. Checked against a fresh generator on first use.
_MT_WORDS = 624
_MT_OFFSET = 24
_MT_STATE_BYTES = 5056


@lru_cache(maxsize=1)
def _torch_template() -> np.ndarray:
    state = torch.Generator().get_state().numpy().copy()  # seeded with torch's default
    seed, left, seeded, _ = struct.unpack("<QiiQ", state[:_MT_OFFSET].tobytes())
    first = int(state[_MT_OFFSET : _MT_OFFSET + 8].view("<u8")[0])
    if state.size != _MT_STATE_BYTES or first != seed & 0xFFFFFFFF or seeded != 1 or left < 1:
        raise RuntimeError(  # pragma: no cover - a torch whose CPU generator changed layout
            f"torch {torch.__version__}: unexpected CPU generator state layout; secret "
            "draws cannot set it in full"
        )
    return state


def secret_torch_state(secret: bytes, purpose: str, *keys: int) -> torch.Tensor:
    """A full torch CPU generator state (all 19,968 bits of MT19937) from the secret.

    For ``torch.Generator.set_state`` or ``torch.random.set_rng_state``: unlike
    ``manual_seed``, which keeps 32 bits, every state word comes from
    :func:`secret_rng`.
    """
    state = _torch_template().copy()
    words = secret_rng(secret, purpose, *keys).integers(0, 2**32, _MT_WORDS, dtype=np.uint64)
    if not words.any():  # pragma: no cover - probability 2**-19968; MT's one bad state
        words[0] = 1
    state[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS] = words.astype("<u8").view(np.uint8)
    state[:8] = 0  # no initial seed: the state did not come from one
    state[12:16] = np.array([1], dtype="<i4").view(np.uint8)  # seeded
    state[8:12] = np.array([1], dtype="<i4").view(np.uint8)  # left: twist before the first draw
    return torch.from_numpy(state)


def secret_torch_generator(secret: bytes, purpose: str, *keys: int) -> torch.Generator:
    """A torch CPU generator whose whole state derives from the secret."""
    generator = torch.Generator()
    generator.set_state(secret_torch_state(secret, purpose, *keys))
    return generator


@contextmanager
def torch_rng_from_secret(secret: bytes, purpose: str, *keys: int) -> Iterator[None]:
    """Inside: torch's global CPU generator has a full state from the secret.

    For code that draws from the global generator (module constructors,
    ``reset_parameters``, dropout). The generator's previous state is put
    back afterwards. GPU generators are left alone: CUDA's Philox keeps a
    64-bit seed, so keep secret draws on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(secret_torch_state(secret, purpose, *keys))
        yield


def init_from_secret(model: nn.Module, secret: bytes, purpose: str = "init") -> nn.Module:
    """Re-initialise every parameter of ``model`` from the server secret; return it.

    A model built as ``Net()`` takes torch's process seed, which a client can
    search (32 bits). This calls each module's ``reset_parameters`` with
    torch's global generator set in full from the secret (see
    :func:`torch_rng_from_secret`), so the server's initialisation -- and what a
    server mask hides of it -- cannot be recomputed. Same secret: same weights.

    Raises
    ------
    ValueError
        A parameter belongs to a module without ``reset_parameters`` (its
        initialisation is the module's own code): build the model inside
        ``with torch_rng_from_secret(secret, "init"):`` instead.

    """
    covered: set[int] = set()
    with torch_rng_from_secret(secret, purpose):
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if reset is None:
                reset = getattr(module, "_reset_parameters", None)  # nn.MultiheadAttention
            if callable(reset):
                reset()
                covered.update(id(p) for p in module.parameters(recurse=False))
    missed = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missed:
        raise ValueError(
            f"init_from_secret: no reset_parameters() re-initialises {missed}; build the model "
            "inside `with fedqsn_flwr.torch_rng_from_secret(secret, 'init'):` instead"
        )
    return model


def derive_seed(purpose: str, *keys: int) -> int:
    """A 63-bit seed for ``purpose`` from integer keys (run seed, round, node, ...).

    Injective: a hash of the purpose comes first (domain separation: sampling
    and client training never share a seed), then the number of keys, then
    every key as exactly two 32-bit words. (numpy's ``SeedSequence`` pads short
    entropy with zero words, which made ``(s, r, 1, 0)`` and ``(s, r, 1)``
    collide, and splits each integer into as many words as it needs, which lets
    ``(2**32, 5)`` and ``(0, 1 + 5 * 2**32)`` collide.) Keys are in 0..2**64-1.
    Nothing a client must not predict may come from it: such draws use
    generators filled from the server secret (:mod:`fedqsn_flwr.core.secret`).
    """
    tag = int.from_bytes(hashlib.blake2b(purpose.encode(), digest_size=8).digest(), "little")
    words = [tag & 0xFFFFFFFF, tag >> 32, len(keys)]
    for key in keys:
        key = int(key)
        if not 0 <= key < 2**64:
            raise ValueError(f"derive_seed keys are 0..2**64-1, got {key}")
        words += [key & 0xFFFFFFFF, key >> 32]
    state = np.random.SeedSequence(words)
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def secret_digest(secret: bytes) -> str:
    """A fingerprint of ``secret`` for server-side checkpoints (tells secrets apart only).

    Keyed BLAKE2b of a fixed label: it reveals nothing usable about the secret,
    and no draw :func:`secret_entropy` derives equals it.
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
    os.fchmod(fd, 0o600)  # a leftover tmp file would keep its own mode
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    os.replace(tmp, file)


def explicit_secret(
    config: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[bytes, str] | None:
    """The secret given by ``FEDQSN_SERVER_SECRET`` or ``server-secret-file``, and which.

    None when neither is set (sources 1 and 2 of the module docstring).
    """
    environ = os.environ if environ is None else environ
    if environ.get(SECRET_ENV):
        return from_text(environ[SECRET_ENV]), f"environment variable {SECRET_ENV}"
    if config.get("server-secret-file"):
        return read_secret_file(config["server-secret-file"]), "server-secret-file"
    return None


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
    explicit = explicit_secret(config, environ)
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
