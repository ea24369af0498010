"""Estimate the run time of each preset from measured training and evaluation steps.

    python benchmarks/preset_times.py [--only roberta gpt2] [--device cuda]

The machine cannot download MNIST, CIFAR-10 or AG News, so the presets are not
run end to end here. Instead this script measures, on random inputs of the right
shape, one SGD step (batch 32) with one thread -- as each simulated client
trains -- and with all threads -- as the server pretrains -- and one evaluation
batch of 512, then multiplies by the number of steps the preset implies (10
virtual SuperNodes, two training at a time on a 2-core machine; the server
evaluates the global model, the server model and every proxy on its test set
each round). It prints the estimate per preset; docs/configuration.md quotes it.

The Hugging Face presets (``roberta-sst2``, ``gpt2-e2e``) are measured on a
``roberta-base``- and a ``gpt2``-sized model built from their default configs
(random weights: the time of a step does not depend on them), with AdamW as the
presets use. ``--device cuda`` measures on a GPU instead (one client at a time
there: ``PARALLEL`` = 1).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from fedqsn_flwr.app.base import InputSpec
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.training import task_loss

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
    # GLUE SST-2: 67,349 training sentences, 872 validation sentences (the test set)
    "roberta-sst2": (
        "hf-roberta",
        InputSpec("text", (64,), 2, 50265),
        67_349,
        872,
        5,
        1,
        0.05,
        1,
        32,
    ),
    # E2E NLG: 42,061 training pairs, 4,693 test pairs
    "gpt2-e2e": (
        "hf-gpt2",
        InputSpec("text", (64,), 0, 50257, task="causal-lm"),
        42_061,
        4_693,
        5,
        1,
        0.05,
        1,
        32,
    ),
}


def _hf_model(name: str, spec: InputSpec) -> nn.Module:
    """A roberta-base- or gpt2-sized model (default config, random weights), wrapped."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    from fedqsn_flwr.app.huggingface import HuggingFaceModel

    if name == "hf-roberta":
        model = RobertaForSequenceClassification(RobertaConfig(num_labels=spec.num_classes))
        return HuggingFaceModel(model, 1, "classification")
    return HuggingFaceModel(GPT2LMHeadModel(GPT2Config()), 50256, "causal-lm")


def _inputs(spec: InputSpec, n: int, device: torch.device) -> torch.Tensor:
    if spec.kind == "text":
        return torch.randint(2, spec.vocab_size, (n, *spec.shape), device=device)
    return torch.randn(n, *spec.shape, device=device)


def _targets(spec: InputSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.task == "causal-lm":
        return x.clone()
    return torch.randint(0, spec.num_classes, (x.shape[0],), device=x.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(
    model: nn.Module,
    spec: InputSpec,
    batch: int,
    threads: int,
    device: torch.device,
    adamw: bool = False,
) -> float:
    torch.set_num_threads(threads)
    optimizer = (
        torch.optim.AdamW(model.parameters(), lr=1e-5)
        if adamw
        else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    )
    x = _inputs(spec, batch, device)
    y = _targets(spec, x)
    model.train()
    times = []
    for _ in range(6):
        _sync(device)
        started = time.perf_counter()
        optimizer.zero_grad()
        task_loss(model(x), y).backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2]


@torch.no_grad()
def _eval_seconds(model: nn.Module, spec: InputSpec, threads: int, device: torch.device) -> float:
    torch.set_num_threads(threads)
    model.eval()
    # language models: 128 rows at a time keep the (rows, 64, 50257) logits small
    rows = 128 if spec.task == "causal-lm" else 512
    x = _inputs(spec, rows, device)
    model(x)
    _sync(device)
    started = time.perf_counter()
    model(x)
    _sync(device)
    return (time.perf_counter() - started) * 512 / rows


def main() -> None:
    """Print the estimate of every preset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="presets whose name contains these")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    parallel = PARALLEL if device.type == "cpu" else 1
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
        if args.only and not any(part in name for part in args.only):
            continue
        torch.manual_seed(0)
        if model_name.startswith("hf-"):
            model = _hf_model(model_name, spec).to(device)
        else:
            model = build_model(model_name, 0.1, seed=0, spec=spec).to(device)
        client_threads = 1 if device.type == "cpu" else threads
        adamw = model_name.startswith("hf-")  # as the Hugging Face presets train
        client_step = _step_seconds(model, spec, batch, client_threads, device, adamw)
        server_step = _step_seconds(model, spec, batch, threads, device, adamw)
        eval_batch = _eval_seconds(model, spec, threads, device)
        pretrain = round(pre_frac * train)
        per_client = (train - pretrain) / NODES * 0.8  # 20% kept for local evaluation
        client_steps = epochs * math.ceil(per_client / batch)
        round_train = math.ceil(NODES / parallel) * client_steps * client_step
        round_eval = (2 + NODES) * math.ceil(test / 512) * eval_batch
        total = pre_epochs * math.ceil(pretrain / batch) * server_step + rounds * (
            round_train + round_eval
        )
        print(
            f"{name} on {device.type}: {total / 60:.0f} min (client step "
            f"{client_step * 1e3:.1f} ms on {client_threads} thread(s), server step "
            f"{server_step * 1e3:.1f} ms on {threads}; {client_steps} steps per client per "
            f"round; evaluation {round_eval:.0f} s per round)",
            flush=True,
        )
        del model


if __name__ == "__main__":
    main()
