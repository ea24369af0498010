"""The user's side of things: a model, data, a training loop, an evaluation."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


class Net(nn.Module):
    """A small MLP on 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 128)
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of flattened 8x8 images."""
        return self.out(torch.relu(self.hidden(x)))


def load_data(
    partition_id: int | None = None, num_partitions: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's share of digits' first 80 %, or (partition_id None) the last 20 %."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    cut = int(0.8 * len(y))
    if partition_id is None:
        return x[cut:], y[cut:]
    rows = np.arange(cut)[partition_id::num_partitions]
    return x[rows], y[rows]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> float:
    """Adam, mini-batches of 32; returns the mean loss of the last epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        losses = []
        for rows in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses))


def test(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on x, y."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()
