"""Train and evaluate loops shared by clients, the server's pretraining and evaluation."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from fedqsn_flwr.app.splits import Split

#: Values the ``device`` config key accepts.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def pick_device(name: str) -> torch.device:
    """The torch device a ``device`` config value names (``auto``: CUDA when present)."""
    if DEVICE_PATTERN.fullmatch(name) is None:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:<index>, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live."""
    return next(model.parameters()).device


def train(
    model: nn.Module,
    data: Split,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    frozen: Mapping[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> float:
    """Train ``model`` in place with SGD (momentum 0.9); return the mean batch loss.

    ``frozen`` maps parameter names to boolean masks of entries that must not
    change (a proxy's hidden units: they stay exactly zero, so the client trains
    the subnetwork it was given and nothing else). ``proximal_mu`` > 0 adds
    FedProx's term ``mu/2 * ||w - w_received||^2`` to the loss.
    """
    if len(data) == 0 or epochs == 0:
        return float("nan")
    torch.manual_seed(seed)  # dropout
    order_rng = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    anchor = {name: p.detach().clone() for name, p in params.items()} if proximal_mu else {}
    device = model_device(model)
    # 0/1 factors rather than masked_fill_ with the (broadcast) masks: a multiply
    # by a dense tensor is several times cheaper per step on small layers.
    keep = {
        name: (~mask).to(device=device, dtype=params[name].dtype).contiguous()
        for name, mask in (frozen or {}).items()
        if name in params
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=order_rng)
        for start in range(0, len(data), batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(data.inputs(rows).to(device)), data.y[rows].to(device))
            objective = loss
            if anchor:
                drift = sum((params[n] - a).pow(2).sum() for n, a in anchor.items())
                objective = loss + proximal_mu / 2 * drift
            objective.backward()
            for name, factor in keep.items():
                params[name].grad.mul_(factor)
            optimizer.step()
            total += loss.item()
            batches += 1
    return total / batches


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 512) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on ``data``."""
    if len(data) == 0:
        return float("nan"), float("nan")
    model.eval()
    device = model_device(model)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = data.inputs(slice(start, start + batch_size)).to(device)
        y = data.y[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    return loss_sum / len(data), correct / len(data)


def loss_gradient(
    model: nn.Module,
    state: Mapping[str, torch.Tensor] | None,
    data: Split,
    batch_size: int = 512,
) -> dict[str, torch.Tensor]:
    """Mean cross-entropy gradient of every parameter of ``model`` (loaded with ``state``).

    In eval mode (no dropout), so the same state and data give the same gradient
    on the client and on the server. ``state`` None uses the model as it is.
    """
    if state is not None:
        model.load_state_dict(dict(state))
    model.eval()
    model.zero_grad(set_to_none=True)
    device = model_device(model)
    with torch.enable_grad():
        for start in range(0, len(data), batch_size):
            x = data.inputs(slice(start, start + batch_size)).to(device)
            y = data.y[start : start + batch_size].to(device)
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum") / len(data)
            loss.backward()
    grads = {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return grads


def evaluate_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], data: Split
) -> tuple[float, float]:
    """Load ``state`` into ``model`` and evaluate it on ``data``."""
    model.load_state_dict(dict(state))
    return evaluate(model, data)
