"""Models by name, sized from the data they are built for.

Dropout sits exactly where the mask policy hides units: pretraining with dropout
on the same hidden features that FedQSN masks makes the model robust to losing
them (a quick experiment on digits: far less accuracy lost under unit masks than
without dropout), so each model applies dropout to the input of every masked
layer.

A model may define ``fedqsn_unit_axes() -> dict[str, int]`` (state-dict name ->
unit axis) to say which of its tensors are masked and along which axis; without
it, :func:`fedqsn_flwr.core.masking.policy_for_model` masks the input features of
every ``Linear``/``Conv`` layer but the first (whose input is the raw data).

``model`` may be ``"hf:<folder>"``: a Hugging Face checkpoint saved on disk
(:mod:`fedqsn_flwr.app.huggingface`; RoBERTa/BERT classifiers, GPT-2 language
models). It may also be ``"package.module:factory"``: any importable callable that
takes keyword arguments ``spec`` (:class:`InputSpec`) and ``dropout`` and returns
a ``torch.nn.Module`` -- the way to run FedQSN on your own architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedqsn_flwr.app.base import (
    CLASSIFICATION,
    MODEL_NAMES,
    InputSpec,
    is_factory_path,
    is_hf,
    load_factory,
)
from fedqsn_flwr.app.huggingface import load_hf_model
from fedqsn_flwr.core.secret import torch_rng_from_secret

#: scikit-learn's digits: 1 x 8 x 8 images, 10 classes.
DIGITS_SPEC = InputSpec("image", (1, 8, 8), 10)


def _image_shape(spec: InputSpec, model: str) -> tuple[int, int, int]:
    if spec.kind != "image" or len(spec.shape) != 3:
        raise ValueError(f"model '{model}' needs images (C, H, W); the data is {spec.kind}")
    channels, height, width = spec.shape
    return channels, height, width


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (32, 64 channels, 2x2 max-pooling) and two linear layers.

    For the digits' 1x8x8 images this is 53,002 parameters; the first linear
    layer grows with the image (MNIST: 421,642 parameters).
    """

    def __init__(self, spec: InputSpec = DIGITS_SPEC, dropout: float = 0.2) -> None:
        super().__init__()
        channels, height, width = _image_shape(spec, "cnn")
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 128)
        self.fc2 = nn.Linear(128, spec.num_classes)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.drop_channels = nn.Dropout2d(dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, C, H, W) images."""
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(self.drop_channels(x))))
        x = self.act(self.fc1(self.drop(x.flatten(1))))
        return self.fc2(self.drop(x))


def _flat_features(spec: InputSpec, model: str) -> int:
    if spec.kind not in ("image", "signal"):
        raise ValueError(f"model '{model}' needs images or signals; the data is {spec.kind}")
    return math.prod(spec.shape)


class MLP(nn.Module):
    """A perceptron on flattened inputs (images or 1-D signals).

    ``hidden=(256, 128)`` by default (``mlp``); ``mlp512`` is the 512-512 one of
    the MNIST-1D setting (40-512-512-10: 288,778 parameters).
    """

    def __init__(
        self,
        spec: InputSpec = DIGITS_SPEC,
        dropout: float = 0.2,
        hidden: tuple[int, int] = (256, 128),
    ) -> None:
        super().__init__()
        features = _flat_features(spec, "mlp")
        self.fc1 = nn.Linear(features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], spec.num_classes)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (flattened)."""
        x = self.act(self.fc1(x.flatten(1)))
        x = self.act(self.fc2(self.drop(x)))
        return self.fc3(self.drop(x))


def mlp512(spec: InputSpec, dropout: float = 0.2) -> nn.Module:
    """:class:`MLP` with two hidden layers of 512 features."""
    return MLP(spec, dropout, hidden=(512, 512))


class SignalCNN(nn.Module):
    """A small 1-D CNN for (C, L) signals such as MNIST-1D.

    Two convolutions (32 and 64 channels, max-pooling by 2) and two linear
    layers; for MNIST-1D's 1 x 40 signals 89,738 parameters. The attacks use it
    as the colluding clients' own architecture (a CNN from scratch).
    """

    def __init__(self, spec: InputSpec, dropout: float = 0.2) -> None:
        super().__init__()
        if spec.kind != "signal" or len(spec.shape) != 2:
            raise ValueError(f"model 'cnn1d' needs signals (C, L); the data is {spec.kind}")
        channels, length = spec.shape
        self.conv1 = nn.Conv1d(channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv1d(32, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64 * (length // 4), 128)
        self.fc2 = nn.Linear(128, spec.num_classes)
        self.pool = nn.MaxPool1d(2)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, C, L) signals."""
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(self.drop(x))))
        x = self.act(self.fc1(self.drop(x.flatten(1))))
        return self.fc2(self.drop(x))


def resnet18(spec: InputSpec, dropout: float = 0.0) -> nn.Module:
    """ResNet-18 from torchvision, adapted to 32x32 inputs (11.2 M parameters for CIFAR-10).

    As is usual for CIFAR: the 7x7 stride-2 stem becomes a 3x3 stride-1
    convolution and the stem's max-pooling is dropped, so a 32x32 image keeps
    enough resolution for the four stages. ``dropout`` is not used (BatchNorm).
    """
    from torchvision.models import resnet18 as torchvision_resnet18

    channels, _, _ = _image_shape(spec, "resnet18")
    model = torchvision_resnet18(num_classes=spec.num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block from plain ``torch.nn`` layers.

    Multi-head self-attention with separate query/key/value/output projections
    (``nn.Linear``, so each projection's input features are units the mask can
    hide) and a two-layer MLP.
    """

    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.output = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """``x``: (N, T, width); ``padding``: (N, T), True at padding positions."""
        n, t, width = x.shape
        h = self.drop(self.norm1(x))

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(n, t, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = q @ k.transpose(-2, -1) / math.sqrt(width // self.heads)
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, t, width)
        x = x + self.output(self.drop(attended))
        return x + self.down(self.drop(self.act(self.up(self.drop(self.norm2(x))))))


class TextTransformer(nn.Module):
    """A small transformer encoder classifier for token-id sequences.

    Token and position embeddings (width 64), 2 encoder blocks (4 heads, MLP
    hidden 128), mean-pooling over non-padding tokens, and a linear classifier.
    The FedQSN units (see :meth:`fedqsn_unit_axes`) are the embedding dimensions
    of the embedding tables, the input features of every projection in the
    blocks, and the pooled features of the classifier.
    """

    def __init__(
        self,
        spec: InputSpec,
        dropout: float = 0.1,
        *,
        width: int = 64,
        heads: int = 4,
        hidden: int = 128,
        depth: int = 2,
    ) -> None:
        super().__init__()
        if spec.kind != "text" or spec.vocab_size < 2:
            raise ValueError(f"model 'transformer' needs token ids; the data is {spec.kind}")
        self.tokens = nn.Embedding(spec.vocab_size, width, padding_idx=0)
        self.positions = nn.Embedding(spec.shape[0], width)
        self.blocks = nn.ModuleList(
            EncoderBlock(width, heads, hidden, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, spec.num_classes)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, T) token ids (0 = padding)."""
        padding = x == 0
        # A sequence of only padding would attend to nothing; let it see itself.
        padding = padding & ~padding.all(dim=1, keepdim=True)
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.tokens(x) + self.positions(positions)[None]
        for block in self.blocks:
            h = block(h, padding)
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        pooled = (self.norm(h) * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        return self.head(self.drop(pooled))

    def fedqsn_unit_axes(self) -> dict[str, int]:
        """Masked tensors and their unit axis (1 = input features / embedding dims)."""
        axes = {"tokens.weight": 1, "positions.weight": 1, "head.weight": 1}
        for i in range(len(self.blocks)):
            for name in ("query", "key", "value", "output", "up", "down"):
                axes[f"blocks.{i}.{name}.weight"] = 1
        return axes


ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "cnn": SmallCNN,
    "mlp": MLP,
    "mlp512": mlp512,
    "cnn1d": SignalCNN,
    "resnet18": resnet18,
    "transformer": TextTransformer,
}
if tuple(MODELS) != MODEL_NAMES:  # pragma: no cover - a model added in one place only
    raise ImportError("fedqsn_flwr.app.base.MODEL_NAMES must name exactly the MODELS here")


def build_model(
    name: str,
    dropout: float = 0.2,
    seed: int | None = None,
    spec: InputSpec = DIGITS_SPEC,
    pretrained: bool = True,
    secret: bytes | None = None,
) -> nn.Module:
    """Instantiate the model registered as ``name`` (or a factory path) for ``spec``.

    With ``seed``, the initial weights are those anyone can reproduce from the
    code and the seed: a *public initialisation*. With ``secret`` (the server
    secret), every weight the constructor draws -- a Hugging Face checkpoint's
    new classification head included -- comes from torch's generator filled in
    full from the secret (:func:`fedqsn_flwr.core.secret.torch_rng_from_secret`):
    the server's initialisation, which no client can recompute. ``pretrained``
    False builds a Hugging Face model from its config alone (no weights read:
    a client's model, whose weights come in the proxy); other models ignore it.
    """
    if seed is not None and secret is not None:
        raise ValueError("build_model takes a public seed or the server secret, not both")
    if secret is not None:
        with torch_rng_from_secret(secret, "init"):
            return build_model(name, dropout, None, spec, pretrained)
    if is_hf(name):
        if spec.kind != "text":
            raise ValueError(f"model '{name}' needs text; the data is {spec.kind}")
        if seed is not None:
            torch.manual_seed(seed)  # a new classification head
        return load_hf_model(
            name, spec.task, spec.num_classes, spec.vocab_size, spec.shape[0], pretrained
        )
    if spec.task != CLASSIFICATION:
        raise ValueError(
            f"model '{name}' is a classifier and the data is for {spec.task}; use a Hugging "
            "Face language model: model = 'hf:<folder>'"
        )
    if is_factory_path(name):
        factory = load_factory(name)
    elif name in MODELS:
        factory = MODELS[name]
    else:
        raise ValueError(
            f"unknown model '{name}'; allowed: {sorted(MODELS)} or 'package.module:factory'"
        )
    if seed is not None:
        torch.manual_seed(seed)
    model = factory(spec=spec, dropout=dropout)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
