"""Models by name. Dropout sits exactly where the mask policy hides units.

Pretraining with dropout on the same hidden features that FedQSN masks makes the
model robust to losing them (a quick experiment on digits: far less accuracy lost
under unit masks than without dropout), so each model applies dropout to the
input of every weight layer but the first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers and two linear layers for 1x8x8 images."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.drop_channels = nn.Dropout2d(dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, 1, 8, 8) images."""
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(self.drop_channels(x))))
        x = self.act(self.fc1(self.drop(x.flatten(1))))
        return self.fc2(self.drop(x))


class DigitsMLP(nn.Module):
    """A 64-256-128-10 perceptron for flattened 8x8 images."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_classes)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (flattened to 64 features)."""
        x = self.act(self.fc1(x.flatten(1)))
        x = self.act(self.fc2(self.drop(x)))
        return self.fc3(self.drop(x))


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": DigitsCNN, "mlp": DigitsMLP}


def build_model(name: str, dropout: float = 0.2, seed: int | None = None) -> nn.Module:
    """Instantiate the model registered as ``name``.

    With ``seed``, the initial weights are those anyone can reproduce from the
    code and the seed: the *public initialisation* of a run.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; allowed: {sorted(MODELS)}")
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name](dropout=dropout)
