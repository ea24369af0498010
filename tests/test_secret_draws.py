"""Every secret draw gets a generator's whole state from the secret, never an integer seed.

torch's CPU ``manual_seed`` keeps 32 bits of any seed: a client that searches
2**32 seeds against the values of one proxy recovers every server-hidden weight
of a run initialised from such a seed. These tests record every seed that
reaches a random generator's entry points while the server makes its secret
draws (real in-process runs: data split, initialisation, pretraining, server
and client masks, feedback sample) under two secrets with the same public seed.
A value recorded under one secret and not the other is secret-derived.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedqsn_flwr.app import splits
from fedqsn_flwr.core.secret import SECRET_ENV, SECRET_FILE
from fedqsn_flwr.experiments.inprocess import run_in_process

#: Entry points that keep less state than the secret, whatever they are given.
WEAK = {
    "torch.manual_seed",
    "torch.Generator.manual_seed",
    "torch.cuda.manual_seed",
    "np.random.seed",
    "np.random.RandomState",
    "np.random.MT19937",
    "random.seed",
    "random.Random",
}


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | list | tuple):
        return tuple(_plain(v) for v in np.asarray(value, dtype=object).ravel())
    if isinstance(value, np.integer | int):
        return int(value)
    return type(value).__name__  # a generator or bit generator passed on: not a seed


class Recorder:
    """Patches the generators' seeding entry points; keeps (entry point, seed) pairs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, Any]] = []
        seen = self.calls

        def wrap(name: str, function: Any) -> Any:
            def recorded(*args: Any, **kwargs: Any) -> Any:
                if args or kwargs:
                    seen.append((name, _plain(args[0] if args else next(iter(kwargs.values())))))
                return function(*args, **kwargs)

            return recorded

        class Generator(torch.Generator):
            def manual_seed(self, seed: Any) -> torch.Generator:
                seen.append(("torch.Generator.manual_seed", _plain(seed)))
                return super().manual_seed(seed)

        def subclass(name: str, base: type) -> type:
            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
                if args and args[0] is not None:
                    seen.append((name, _plain(args[0])))
                base.__init__(self, *args, **kwargs)

            return type(base.__name__, (base,), {"__init__": __init__})

        def seed_sequence(entropy: Any = None, *args: Any, **kwargs: Any) -> Any:
            if entropy is not None:
                seen.append(("np.random.SeedSequence", _plain(entropy)))
            return real_seed_sequence(entropy, *args, **kwargs)

        real_seed_sequence = np.random.SeedSequence
        monkeypatch.setattr(torch, "manual_seed", wrap("torch.manual_seed", torch.manual_seed))
        monkeypatch.setattr(torch.random, "manual_seed", torch.manual_seed)
        monkeypatch.setattr(torch, "Generator", Generator)
        for cuda in ("manual_seed", "manual_seed_all"):
            monkeypatch.setattr(
                torch.cuda, cuda, wrap("torch.cuda.manual_seed", getattr(torch.cuda, cuda))
            )
        monkeypatch.setattr(np.random, "seed", wrap("np.random.seed", np.random.seed))
        monkeypatch.setattr(
            np.random, "default_rng", wrap("np.random.default_rng", np.random.default_rng)
        )
        monkeypatch.setattr(np.random, "SeedSequence", seed_sequence)
        for name in ("PCG64", "MT19937", "Philox", "SFC64"):
            real = getattr(np.random, name)
            monkeypatch.setattr(np.random, name, wrap(f"np.random.{name}", real))
        monkeypatch.setattr(
            np.random, "RandomState", subclass("np.random.RandomState", np.random.RandomState)
        )
        monkeypatch.setattr(random, "seed", wrap("random.seed", random.seed))
        monkeypatch.setattr(random, "Random", subclass("random.Random", random.Random))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    threads = torch.get_num_threads()
    yield Recorder(monkeypatch)
    torch.set_num_threads(threads)


#: Small federations that make every secret draw: the digits split with
#: pretraining, feedback and evaluation proxies; MNIST-1D's generated server data.
RUNS = {
    "digits": {
        "hidden-feedback": True,
        "fraction-evaluate": 1.0,
        "pretrain-epochs": 1,
    },
    "mnist1d": {
        "dataset": "mnist1d",
        "model": "mlp512",
        "mnist1d-server-examples": 200,
        "mnist1d-test-examples": 100,
        "mnist1d-client-examples": 20,
        "pretrain-epochs": 1,
    },
}


def _run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorder: Recorder, name: str, secret: str
) -> tuple[list[tuple[str, Any]], dict[str, torch.Tensor], bytes]:
    monkeypatch.setenv(SECRET_ENV, secret)
    for cached in (splits.load_server_data, splits.load_pool, splits.load_client_data):
        cached.cache_clear()  # every run makes all of its draws
    # the clients set one thread; without this the first run of a process
    # pretrains on more (other float sums: another model, same draws)
    torch.set_num_threads(1)
    start = len(recorder.calls)
    out = tmp_path / f"{name}-{secret}-{start}"
    overrides = {
        **RUNS[name],
        "output-dir": str(out),
        "num-server-rounds": 1,
        "local-epochs": 1,
        "min-nodes": 3,
        "seed": 7,
        "pretrain-cache": False,
    }
    run = run_in_process(overrides, num_nodes=3)
    final = torch.load(run / "final_model.pt", weights_only=True)
    return recorder.calls[start:], final, (run / SECRET_FILE).read_bytes()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_no_secret_derived_value_reaches_a_generator_with_less_state_than_the_secret(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    # the first run of a process also makes one-time draws (imports, caches)
    _, model_warm, _ = _run(tmp_path, monkeypatch, recorder, name, "second secret")
    a, model_a, secret_a = _run(tmp_path, monkeypatch, recorder, name, "first secret")
    again, model_again, _ = _run(tmp_path, monkeypatch, recorder, name, "first secret")
    b, model_b, secret_b = _run(tmp_path, monkeypatch, recorder, name, "second secret")
    assert secret_a != secret_b
    # the same secret repeats every draw and every weight
    assert a == again
    assert all(torch.equal(model_a[k], model_again[k]) for k in model_a)
    assert all(torch.equal(model_b[k], model_warm[k]) for k in model_b)
    # another secret gives another model (initialisation, data, masks)
    assert any(not torch.equal(model_a[k], model_b[k]) for k in model_a)
    secret_derived = (set(a) - set(b)) | (set(b) - set(a))
    # the secret draws were seen: the recorder is not blind to them
    assert any(entry == "np.random.SeedSequence" for entry, _ in secret_derived)
    weak = sorted(str(c) for c in secret_derived if c[0] in WEAK)
    assert not weak, f"secret-derived seeds reached generators that keep 32-64 bits: {weak}"
    small = sorted(
        str(c) for c in secret_derived if not isinstance(c[1], int) or not c[1] >= 2**128
    )
    assert not small, f"secret-derived seeds of fewer than 128 bits: {small}"
    # the public draws (client training, sampling) are the same under both secrets
    assert set(a) & set(b)
