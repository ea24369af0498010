"""The app's ground floor: names and shapes every app module shares.

It imports nothing of the app, so any module may import it: the tasks a model
serves, the data sets, partitionings, optimizers and devices a config may name,
what an example looks like (:class:`InputSpec`) and a set of examples
(:class:`Split`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

HF_PREFIX = "hf:"
#: InputSpec tasks.
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
#: Label of a token that is not scored (prompt and padding), as in transformers.
IGNORE_INDEX = -100


def is_hf(name: str) -> bool:
    """Whether a ``model`` value names a Hugging Face checkpoint folder."""
    return name.startswith(HF_PREFIX)


def is_factory_path(name: str) -> bool:
    """Whether ``name`` is a ``package.module:callable`` path rather than a built-in name."""
    return ":" in name and not is_hf(name)


#: Built-in models by name (``model``; :data:`fedqsn_flwr.app.models.MODELS` builds them).
MODEL_NAMES = ("cnn", "mlp", "mlp512", "cnn1d", "resnet18", "transformer")


def load_factory(path: str, what: str = "model") -> Callable[..., Any]:
    """Import ``package.module:callable`` (a user's ``what``; ValueError names what is wrong)."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import '{module_name}' for {what} '{path}': {err}") from err
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"'{path}' does not name a callable in module '{module_name}'")
    return factory


#: Built-in models by name (``model``; :data:`fedqsn_flwr.app.models.MODELS` builds them).
MODEL_NAMES = ("cnn", "mlp", "mlp512", "cnn1d", "resnet18", "transformer")
#: Data sets by name (``dataset``).
IMAGE_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")
TEXT_DATASETS = ("ag-news", "sst2")
#: GLUE tasks: hub subset -> (first text column, second text column or "", test split).
GLUE_TASKS: dict[str, tuple[str, str, str]] = {
    "sst2": ("sentence", "", "validation"),
    "cola": ("sentence", "", "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
    "wnli": ("sentence1", "sentence2", "validation"),
}
#: Data sets whose examples are token targets for a causal language model.
LANGUAGE_MODELLING = ("e2e_nlg", "brown")
GLUE_E2E_DATASETS = (*(f"glue/{task}" for task in GLUE_TASKS), "e2e_nlg")
DATASETS = (
    "digits",
    "mnist1d",
    *IMAGE_DATASETS,
    *TEXT_DATASETS,
    "text",
    *GLUE_E2E_DATASETS,
    "brown",
)
#: How clients may be given the data (``partitioning``).
PARTITIONINGS = ("iid", "dirichlet", "genre")
#: Values the ``optimizer`` config key accepts.
OPTIMIZERS = ("sgd", "adamw")
#: Values the ``device`` config key accepts.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class InputSpec:
    """What a model's input and output look like.

    Parameters
    ----------
    kind : str
        ``"image"`` (float tensors of ``shape``), ``"signal"`` (float (C, L)
        sequences, e.g. MNIST-1D) or ``"text"`` (token ids).
    shape : tuple[int, ...]
        One example's shape: (channels, height, width) for images, (length,) for
        token sequences.
    num_classes : int
        Output logits (0 for a language model: one per token of the vocabulary).
    vocab_size : int (default: 0)
        Token ids are in ``[0, vocab_size)`` (text only; 0 is padding unless a
        Hugging Face tokenizer says otherwise).
    task : str (default: ``"classification"``)
        ``"classification"`` (one label per example) or ``"causal-lm"`` (a
        target token per position, -100 where not scored).

    """

    kind: str
    shape: tuple[int, ...]
    num_classes: int
    vocab_size: int = 0
    task: str = CLASSIFICATION


@dataclass(frozen=True)
class Split:
    """Examples ``x`` and integer labels ``y`` (one per example, or per token).

    ``x`` holds float features, uint8 images (N, C, H, W) -- standardized per
    channel with ``mean``/``std`` when a batch is taken, so a CIFAR-10 pool stays
    a quarter of its float32 size in memory -- or int64 token ids (N, T).
    """

    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> Split:
        """The rows at ``index``."""
        rows = torch.as_tensor(index, dtype=torch.long)
        return replace(self, x=self.x[rows], y=self.y[rows])

    def inputs(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Model inputs of ``rows``, standardized when ``x`` holds raw pixels."""
        x = self.x[rows]
        if self.mean is None or self.std is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        return (x.to(torch.float32) / 255.0 - mean) / std
