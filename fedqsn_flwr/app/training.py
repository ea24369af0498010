"""Train and evaluate loops shared by clients, the server's pretraining and evaluation.

Labels are one class per example (``y`` (N,)) or, for a causal language model,
one target token per position (``y`` (N, T), :data:`IGNORE_INDEX` where not
scored): position ``t``'s logits predict the token at ``t + 1``, and loss and
accuracy are per scored token (perplexity is ``exp`` of that loss).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from fedqsn_flwr.app.base import DEVICE_PATTERN, IGNORE_INDEX, OPTIMIZERS, Split


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


def task_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of class logits, or of next-token logits for token targets."""
    if y.dim() == 1:
        return nn.functional.cross_entropy(logits, y, reduction=reduction)
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        y[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


#: Rows per evaluation batch for token targets: a language model's logits are
#: rows x tokens x vocabulary (GPT-2, 64 tokens: 206 MB at 16 rows, 6.6 GB at 512).
TOKEN_BATCH_ROWS = 16


def _batch_rows(y: torch.Tensor, batch_size: int) -> int:
    return batch_size if y.dim() == 1 else min(batch_size, TOKEN_BATCH_ROWS)


def _scored(y: torch.Tensor) -> int:
    """Examples (class labels) or scored tokens (token targets) in ``y``."""
    return len(y) if y.dim() == 1 else int((y[:, 1:] != IGNORE_INDEX).sum())


def _correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    if y.dim() == 1:
        return int((logits.argmax(dim=1) == y).sum())
    targets = y[:, 1:]
    hits = (logits[:, :-1].argmax(dim=-1) == targets) & (targets != IGNORE_INDEX)
    return int(hits.sum())


def train(
    model: nn.Module,
    data: Split,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int | torch.Generator,
    proximal_mu: float = 0.0,
    optimizer: str = "sgd",
) -> float:
    """Train ``model`` in place; return the mean batch loss.

    ``optimizer``: ``"sgd"`` (momentum 0.9) or ``"adamw"`` (weight decay 0.01,
    as transformers are usually fine-tuned). A client keeps its proxy's hidden
    units at zero with :func:`fedqsn_flwr.flower.client_helpers.freeze_hidden`
    around this call, as any user's own training loop would. ``proximal_mu`` > 0
    adds FedProx's term ``mu/2 * ||w - w_received||^2`` to the loss.

    ``seed``: an integer seeds dropout and the batch order (a client's public
    seed); a ``torch.Generator`` draws the batch order, and dropout draws from
    torch's global generator as the caller set it (the server's pretraining:
    both filled from the secret, :mod:`fedqsn_flwr.core.secret`).
    """
    if len(data) == 0 or epochs == 0:
        return float("nan")
    if isinstance(seed, int):
        torch.manual_seed(seed)  # dropout
        order_rng = torch.Generator().manual_seed(seed)
    else:
        order_rng = seed
    params = dict(model.named_parameters())
    anchor = {name: p.detach().clone() for name, p in params.items()} if proximal_mu else {}
    device = model_device(model)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    step: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    )
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=order_rng)
        for start in range(0, len(data), batch_size):
            rows = order[start : start + batch_size]
            step.zero_grad()
            loss = task_loss(model(data.inputs(rows).to(device)), data.y[rows].to(device))
            objective = loss
            if anchor:
                drift = sum((params[n] - a).pow(2).sum() for n, a in anchor.items())
                objective = loss + proximal_mu / 2 * drift
            objective.backward()
            step.step()
            total += loss.item()
            batches += 1
    return total / batches


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 512) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on ``data``.

    Per example for class labels, per scored token for token targets.
    """
    scored = _scored(data.y)
    if scored == 0:
        return float("nan"), float("nan")
    batch_size = _batch_rows(data.y, batch_size)
    model.eval()
    device = model_device(model)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = data.inputs(slice(start, start + batch_size)).to(device)
        y = data.y[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(task_loss(logits, y, reduction="sum"))
        correct += _correct(logits, y)
    return loss_sum / scored, correct / scored


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
    scored = max(_scored(data.y), 1)
    batch_size = _batch_rows(data.y, batch_size)
    with torch.enable_grad():
        for start in range(0, len(data), batch_size):
            x = data.inputs(slice(start, start + batch_size)).to(device)
            y = data.y[start : start + batch_size].to(device)
            loss = task_loss(model(x), y, reduction="sum") / scored
            loss.backward()
    grads = {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return grads


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a per-token loss (inf beyond float range, NaN stays NaN)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def evaluate_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], data: Split
) -> tuple[float, float]:
    """Load ``state`` into ``model`` and evaluate it on ``data``."""
    model.load_state_dict(dict(state))
    return evaluate(model, data)
