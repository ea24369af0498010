"""Estimate the CPU run time of each preset from measured training and evaluation steps.

    python benchmarks/preset_times.py

The machine cannot download MNIST, CIFAR-10 or AG News, so the presets are not
run end to end here. Instead this script measures, on random inputs of the right
shape, one SGD step (batch 32) with one thread -- as each simulated client
trains -- and with all threads -- as the server pretrains -- and one evaluation
batch of 512, then multiplies by the number of steps the preset implies (10
virtual SuperNodes, two training at a time on a 2-core machine; the server
evaluates the global model, the server model and every proxy on its test set
each round). It prints the estimate per preset; docs/configuration.md quotes it.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from fedqsn_flwr.app.models import InputSpec, build_model

NODES, PARALLEL = 10, 2

# preset: (model, spec, train examples, test examples, rounds, local epochs,
#          pretrain fraction, pretrain epochs, batch size)
PRESETS = {
    "mnist-cnn": ("cnn", InputSpec("image", (1, 28, 28), 10), 60_000, 10_000, 10, 1, 0.05, 3, 32),
    "cifar10-resnet18": (
        "resnet18",
        InputSpec("image", (3, 32, 32), 10),
        50_000,
        10_000,
        20,
        1,
        0.05,
        5,
        32,
    ),
    "text-transformer (per 10,000 examples)": (
        "transformer",
        InputSpec("text", (64,), 4, 8192),
        8_000,
        2_000,
        10,
        2,
        0.125,
        5,
        32,
    ),
    "ag-news-transformer": (
        "transformer",
        InputSpec("text", (64,), 4, 8192),
        120_000,
        7_600,
        10,
        1,
        0.05,
        2,
        32,
    ),
}


def _inputs(spec: InputSpec, n: int) -> torch.Tensor:
    if spec.kind == "text":
        return torch.randint(1, spec.vocab_size, (n, *spec.shape))
    return torch.randn(n, *spec.shape)


def _step_seconds(model: nn.Module, spec: InputSpec, batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = _inputs(spec, batch), torch.randint(0, spec.num_classes, (batch,))
    model.train()
    times = []
    for _ in range(6):
        started = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2]


@torch.no_grad()
def _eval_seconds(model: nn.Module, spec: InputSpec, threads: int) -> float:
    torch.set_num_threads(threads)
    model.eval()
    x = _inputs(spec, 512)
    model(x)
    started = time.perf_counter()
    model(x)
    return time.perf_counter() - started


def main() -> None:
    """Print the estimate of every preset."""
    threads = torch.get_num_threads()
    for name, (
        model_name,
        spec,
        train,
        test,
        rounds,
        epochs,
        pre_frac,
        pre_epochs,
        batch,
    ) in PRESETS.items():
        model = build_model(model_name, 0.1, seed=0, spec=spec)
        client_step = _step_seconds(model, spec, batch, 1)
        server_step = _step_seconds(model, spec, batch, threads)
        eval_batch = _eval_seconds(model, spec, threads)
        pretrain = round(pre_frac * train)
        per_client = (train - pretrain) / NODES * 0.8  # 20% kept for local evaluation
        client_steps = epochs * math.ceil(per_client / batch)
        round_train = math.ceil(NODES / PARALLEL) * client_steps * client_step
        round_eval = (2 + NODES) * math.ceil(test / 512) * eval_batch
        total = pre_epochs * math.ceil(pretrain / batch) * server_step + rounds * (
            round_train + round_eval
        )
        print(
            f"{name}: {total / 60:.0f} min (step {client_step * 1e3:.1f} ms on 1 thread, "
            f"{server_step * 1e3:.1f} ms on {threads}; {client_steps} steps per client per "
            f"round; evaluation {round_eval:.0f} s per round)"
        )


if __name__ == "__main__":
    main()
