"""Where the examples come from: the ``dataset`` and ``data-dir`` config keys.

Every source yields :class:`RawData`: training examples, the data set's own test
split when it has one, and the :class:`~fedqsn_flwr.app.models.InputSpec` models are
built for. :mod:`fedqsn_flwr.app.splits` then splits and partitions it.

* ``digits`` -- scikit-learn's handwritten digits (ships with scikit-learn; the
  default, nothing to download).
* ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` -- with ``data-dir``
  empty, through flwr-datasets' ``FederatedDataset`` from the Hugging Face Hub
  (needs network the first time; then the Hugging Face cache); with ``data-dir``
  set, through torchvision's dataset classes from that folder, offline
  (``download=False``; layouts in docs/configuration.md).
* ``ag-news``, ``sst2`` -- text classification through ``FederatedDataset``.
* ``text`` -- a local ``train.csv`` or ``train.jsonl`` (``text``, ``label``
  columns; optional ``test.csv``/``test.jsonl``) in ``data-dir``.
* ``glue/<task>`` (``glue/sst2``, ``glue/mrpc``, ...) -- GLUE-style rows
  (``sentence[, sentence2], label``; the task's own column names, see
  :data:`GLUE_TASKS`): with ``data-dir``, from its ``train`` and optional
  ``validation``/``test`` CSV/JSONL files; without, from the hub (``nyu-mll/glue``,
  the task as subset; its validation split is the test set, GLUE's test labels
  are hidden) through flwr-datasets.
* ``e2e_nlg`` -- E2E-style rows, a meaning representation and a reference text
  (``meaning_representation``/``human_reference`` as on the hub, or ``mr``/``ref``
  as in the original CSV files): from ``data-dir`` or the hub
  (``tuetschek/e2e_nlg``). For causal language models: the model reads
  ``<mr> = <reference><eos>`` and is scored on the reference tokens only.
* ``mnist1d`` -- MNIST-1D (Greydanus, 2020), generated procedurally by the
  ``mnist1d`` package: no file, no network. Unlike every other data set, the
  server's and the clients' examples come from two generators (see
  :func:`generate_mnist1d`): the server's pretraining set from the package's
  default one, the clients' pool and the test set from one whose
  ``shear_scale`` is ``mnist1d-client-shear`` (1.25: a shift the server's data
  does not cover; 0.75 is the default generator: no shift).
* ``package.module:loader`` -- your own: a callable taking keyword arguments
  ``data_dir`` and ``seed`` and returning :class:`RawData`, an ``(x, y)`` pair or
  an ``(x_train, y_train, x_test, y_test)`` tuple of tensors. If it also takes
  ``partition_id`` (and ``num_partitions``), it is a *partition loader*: called
  with ``partition_id=None`` it returns the server's data (its test split is the
  server's test set, its training examples the pretraining pool); called with a
  partition id, that client's own ``(x, y)`` -- so every SuperNode can load its
  own data from its own ``data-dir``, and nothing is partitioned here.

Text is tokenized with :func:`tokenize`: lower-cased words hashed into
``vocab-size`` buckets (id 0 is padding), cut or padded to ``max-length`` -- no
vocabulary file, nothing to download, and every party gets the same ids. With a
Hugging Face model (``model = "hf:<folder>"``) the tokenizer saved in that
folder is used instead (``max-length`` still applies).
"""

from __future__ import annotations

import csv
import inspect
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedqsn_flwr.app.base import (
    CAUSAL_LM,
    DATASETS,
    GLUE_E2E_DATASETS,
    GLUE_TASKS,
    IGNORE_INDEX,
    IMAGE_DATASETS,
    TEXT_DATASETS,
    InputSpec,
    is_hf,
    load_factory,
)
from fedqsn_flwr.app.brown import load_brown
from fedqsn_flwr.app.huggingface import hf_folder, load_tokenizer

GLUE_HUB_ID = "nyu-mll/glue"
#: E2E NLG on the hub, and the column names accepted (hub, original CSV files).
E2E_HUB_ID = "tuetschek/e2e_nlg"
E2E_COLUMNS = (("meaning_representation", "human_reference"), ("mr", "ref"))
#: Between an E2E meaning representation and its reference (" " + reference).
E2E_SEPARATOR = " ="
#: MNIST-1D's signals: 1 channel of 40 values, 10 classes.
MNIST1D_LENGTH = 40

#: Hugging Face dataset ids used through flwr-datasets, and their columns.
HF_DATASETS: dict[str, dict[str, str]] = {
    "mnist": {"id": "ylecun/mnist", "x": "image", "y": "label", "test": "test"},
    "fashion-mnist": {
        "id": "zalando-datasets/fashion_mnist",
        "x": "image",
        "y": "label",
        "test": "test",
    },
    "cifar10": {"id": "uoft-cs/cifar10", "x": "img", "y": "label", "test": "test"},
    "cifar100": {"id": "uoft-cs/cifar100", "x": "img", "y": "fine_label", "test": "test"},
    "ag-news": {"id": "fancyzhx/ag_news", "x": "text", "y": "label", "test": "test"},
    # SST-2's own test split is unlabeled; its validation split is the usual test set.
    "sst2": {"id": "stanfordnlp/sst2", "x": "sentence", "y": "label", "test": "validation"},
}

#: Mean and standard deviation of all digits pixels (scaled to [0, 1]).
DIGITS_MEAN, DIGITS_STD = 0.3054, 0.3762


class DataError(ValueError):
    """A data set that cannot be loaded (the message says what to do)."""


@dataclass(frozen=True)
class DataKey:
    """Everything that decides which examples a run uses (hashable, for caching)."""

    dataset: str
    data_dir: str = ""
    vocab_size: int = 8192
    max_length: int = 64
    mnist1d_server_examples: int = 20_000
    mnist1d_client_examples: int = 125
    mnist1d_test_examples: int = 4_000
    mnist1d_client_shear: float = 1.25
    trust_data_dir: bool = False
    tokenizer: str = ""


@dataclass(frozen=True)
class RawData:
    """A data set before splitting.

    Parameters
    ----------
    train_x, train_y : torch.Tensor
        Inputs (float features, uint8 images (N, C, H, W), or int64 token ids
        (N, T)) and int64 labels.
    test_x, test_y : torch.Tensor | None
        The data set's own test split, if it has one.
    spec : InputSpec
        Input shape and number of classes.
    documents, genres : np.ndarray | None, tuple[str, ...]
        For text cut into blocks: the document of every training row and the
        genre of every document (splits keep documents whole).

    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    spec: InputSpec
    #: Document of every training row (language-model blocks cut from whole
    #: documents, as for ``brown``); None when rows are independent examples.
    documents: np.ndarray | None = None
    #: Genre of every document (``documents`` indexes it).
    genres: tuple[str, ...] = ()


def data_key(config: dict[str, Any] | Any) -> DataKey:
    """The :class:`DataKey` of a run config (a Hugging Face model brings its tokenizer)."""
    model = str(config.get("model", ""))
    return DataKey(
        dataset=str(config["dataset"]),
        data_dir=str(config.get("data-dir", "")),
        vocab_size=int(config.get("vocab-size", 8192)),
        max_length=int(config.get("max-length", 64)),
        mnist1d_server_examples=int(config.get("mnist1d-server-examples", 20_000)),
        mnist1d_client_examples=int(config.get("mnist1d-client-examples", 125)),
        mnist1d_test_examples=int(config.get("mnist1d-test-examples", 4_000)),
        mnist1d_client_shear=float(config.get("mnist1d-client-shear", 1.25)),
        trust_data_dir=bool(config.get("trust-data-dir", False)),
        tokenizer=str(hf_folder(model)) if is_hf(model) else "",
    )


def needs_hub(key: DataKey) -> bool:
    """Whether ``key`` is loaded from the Hugging Face Hub (network or its cache)."""
    return (key.dataset in HF_DATASETS or key.dataset in GLUE_E2E_DATASETS) and not key.data_dir


# -- text ------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9']+")


def tokenize(texts: Sequence[str], vocab_size: int, max_length: int) -> torch.Tensor:
    """Token ids (N, max_length): words hashed (CRC-32) into ``1..vocab_size-1``, 0 = padding."""
    if vocab_size < 2:
        raise DataError(f"vocab-size must be at least 2, got {vocab_size}")
    ids = np.zeros((len(texts), max_length), dtype=np.int64)
    for row, text in enumerate(texts):
        words = _WORD.findall(str(text).lower())[:max_length]
        ids[row, : len(words)] = [1 + zlib.crc32(w.encode()) % (vocab_size - 1) for w in words]
    return torch.from_numpy(ids)


def _label_ids(labels: Sequence[Any], mapping: dict[str, int]) -> torch.Tensor:
    return torch.tensor([mapping[str(label)] for label in labels], dtype=torch.long)


def _label_map(labels: Sequence[Any]) -> dict[str, int]:
    """Integer labels keep their value; other labels are numbered in sorted order.

    Negative integers are refused: GLUE marks its hidden test labels -1.
    """
    names = sorted({str(label) for label in labels})
    if any(re.fullmatch(r"-\d+", n) for n in names):
        raise DataError(
            "labels must not be negative (GLUE's test splits hide their labels as -1: use "
            "the validation split as the test set)"
        )
    if all(re.fullmatch(r"\d+", n) for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a CSV (header line) or JSONL file, as a mapping."""
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        else:
            with path.open(encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if not rows:
        raise DataError(f"{path} holds no examples")
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: every line must be a JSON object")
    return rows


def _columns(rows: list[dict[str, Any]], names: Sequence[str], path: Path) -> list[list[Any]]:
    """The values of ``names`` in every row (a DataError names a missing one)."""
    for number, row in enumerate(rows, start=1):
        missing = [n for n in names if row.get(n) is None]
        if missing:
            raise DataError(f"{path}: row {number} has no {missing}; every row needs {list(names)}")
    return [[row[n] for row in rows] for n in names]


#: (first texts, second texts or None, labels) of a text classification split.
TextRows = tuple[list[Any], list[Any] | None, list[Any]]


def _read_table(path: Path) -> TextRows:
    texts, labels = _columns(_read_rows(path), ("text", "label"), path)
    return texts, None, labels


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in (".csv", ".jsonl"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def encode_texts(
    texts: Sequence[Any], key: DataKey, second: Sequence[Any] | None = None
) -> tuple[torch.Tensor, int]:
    """Token ids (N, ``max-length``) of ``texts`` (pairs with ``second``); vocabulary size.

    The Hugging Face tokenizer of ``key.tokenizer`` when set, else :func:`tokenize`
    (a pair is joined by a space).
    """
    if not key.tokenizer:
        if second is not None:
            texts = [f"{a} {b}" for a, b in zip(texts, second, strict=True)]
        return tokenize(texts, key.vocab_size, key.max_length), key.vocab_size
    tokenizer = load_tokenizer(key.tokenizer)
    encoded = tokenizer(
        [str(t) for t in texts],
        None if second is None else [str(t) for t in second],
        padding="max_length",
        truncation=True,
        max_length=key.max_length,
        return_tensors="pt",
    )
    return encoded["input_ids"].long(), len(tokenizer)


def _text_data(train_rows: TextRows, test_rows: TextRows | None, key: DataKey) -> RawData:
    mapping = _label_map(train_rows[2] + (test_rows[2] if test_rows else []))
    train_x, vocab = encode_texts(train_rows[0], key, train_rows[1])
    test_x = encode_texts(test_rows[0], key, test_rows[1])[0] if test_rows else None
    return RawData(
        train_x=train_x,
        train_y=_label_ids(train_rows[2], mapping),
        test_x=test_x,
        test_y=_label_ids(test_rows[2], mapping) if test_rows else None,
        spec=InputSpec("text", (key.max_length,), max(mapping.values()) + 1, vocab),
    )


def load_text_files(key: DataKey) -> RawData:
    """``train.csv``/``train.jsonl`` (and optional ``test.*``) from ``key.data_dir``."""
    folder = Path(key.data_dir).expanduser()
    train = _find(folder, "train")
    if not key.data_dir or train is None:
        raise DataError(
            f"dataset 'text' needs data-dir with train.csv or train.jsonl (columns text, label); "
            f"looked in '{folder}'"
        )
    test = _find(folder, "test")
    return _text_data(_read_table(train), _read_table(test) if test else None, key)


# -- GLUE and E2E ------------------------------------------------------------------


def _hub_splits(dataset: str, subset: str | None, test_split: str, name: str) -> tuple[Any, Any]:
    """(train, test) splits of a hub data set through flwr-datasets."""
    from flwr_datasets import FederatedDataset

    try:
        # our own seeded split follows; keep the data set's order here
        hub = FederatedDataset(
            dataset=dataset, subset=subset, partitioners={"train": 1}, shuffle=False
        )
        return hub.load_split("train"), hub.load_split(test_split)
    except Exception as err:  # network, cache, or format problems all end here
        raise DataError(
            f"cannot load '{name}' ({dataset}{'/' + subset if subset else ''}) through "
            f"flwr-datasets: {err}. Offline, set data-dir to a folder with train.csv or "
            "train.jsonl (see docs/configuration.md)"
        ) from err


def _local_splits(key: DataKey, tests: tuple[str, str]) -> tuple[Path, Path | None]:
    """``train.*`` and the first of ``tests`` (file stems) found in ``data-dir``."""
    folder = Path(key.data_dir).expanduser()
    train = _find(folder, "train")
    if train is None:
        raise DataError(
            f"dataset '{key.dataset}' needs train.csv or train.jsonl in data-dir '{folder}'"
        )
    return train, _find(folder, tests[0]) or _find(folder, tests[1])


def _pick(rows: list[dict[str, Any]], choices: Sequence[Sequence[str]], path: Path) -> list[str]:
    """The first of ``choices`` (column name tuples) that the first row has."""
    for names in choices:
        if all(n in rows[0] for n in names):
            return list(names)
    raise DataError(f"{path}: expected columns {' or '.join(map(str, choices))}")


def load_glue(key: DataKey) -> RawData:
    """A GLUE task (``glue/<task>``): local CSV/JSONL rows, or the hub's ``nyu-mll/glue``."""
    task = key.dataset.split("/", 1)[1]
    first, second, test_split = GLUE_TASKS[task]
    names = (first, second, "label") if second else (first, "label")
    generic = ("sentence", "sentence2", "label") if second else ("sentence", "label")

    def rows_of(columns: list[list[Any]]) -> TextRows:
        return (columns[0], columns[1], columns[2]) if second else (columns[0], None, columns[1])

    if key.data_dir:
        # as on the hub: the validation split is the test set (GLUE hides test labels)
        train_path, test_path = _local_splits(key, ("validation", "test"))
        splits: list[TextRows | None] = []
        for path in (train_path, test_path):
            if path is None:
                splits.append(None)
                continue
            rows = _read_rows(path)
            splits.append(rows_of(_columns(rows, _pick(rows, (names, generic), path), path)))
        return _text_data(splits[0], splits[1], key)  # type: ignore[arg-type]  # train is found
    train, test = _hub_splits(GLUE_HUB_ID, task, test_split, key.dataset)
    return _text_data(
        rows_of([list(train[n]) for n in names]), rows_of([list(test[n]) for n in names]), key
    )


def _lm_examples(
    prompts: Sequence[Any], targets: Sequence[Any], key: DataKey
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids and targets (-100 on the prompt and padding) of prompt -> text pairs."""
    tokenizer = load_tokenizer(key.tokenizer)
    pad = tokenizer.pad_token_id
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    x = torch.full((len(prompts), key.max_length), pad, dtype=torch.long)
    y = torch.full((len(prompts), key.max_length), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        # the prompt may take half the length: every example keeps reference tokens
        head = tokenizer(str(prompt) + E2E_SEPARATOR, add_special_tokens=False)["input_ids"]
        head = head[: key.max_length // 2]
        tail = tokenizer(" " + str(target), add_special_tokens=False)["input_ids"] + eos
        tail = tail[: key.max_length - len(head)]
        ids = torch.tensor(head + tail, dtype=torch.long)
        x[row, : len(ids)] = ids
        y[row, len(head) : len(ids)] = ids[len(head) :]
    return x, y, len(tokenizer)


def load_e2e(key: DataKey) -> RawData:
    """E2E-style rows (meaning representation -> reference) for a causal language model."""
    if not key.tokenizer:
        raise DataError(
            f"dataset '{key.dataset}' is for causal language models: set model = "
            "'hf:<folder>' (a GPT-2-style checkpoint with its tokenizer)"
        )
    pairs: list[tuple[list[Any], list[Any]] | None] = []
    if key.data_dir:
        for path in _local_splits(key, ("test", "validation")):  # as on the hub
            if path is None:
                pairs.append(None)
                continue
            rows = _read_rows(path)
            mr, ref = _columns(rows, _pick(rows, E2E_COLUMNS, path), path)
            pairs.append((mr, ref))
    else:
        mr_name, ref_name = E2E_COLUMNS[0]
        for split in _hub_splits(E2E_HUB_ID, None, "test", key.dataset):
            pairs.append((list(split[mr_name]), list(split[ref_name])))
    if pairs[0] is None:  # pragma: no cover - _local_splits always finds train.*
        raise DataError(f"dataset '{key.dataset}' has no training rows")
    train_x, train_y, vocab = _lm_examples(*pairs[0], key)
    test_x = test_y = None
    if pairs[1] is not None:
        test_x, test_y, _ = _lm_examples(*pairs[1], key)
    spec = InputSpec("text", (key.max_length,), 0, vocab, task=CAUSAL_LM)
    return RawData(train_x, train_y, test_x, test_y, spec)


def lm_blocks(texts: Sequence[str], key: DataKey) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Plain-text documents as causal-LM blocks: (ids, targets, document of each block).

    Each document (EOS appended) is tokenized whole and cut into blocks of
    ``max-length`` tokens; the last block of a document is padded (targets
    :data:`IGNORE_INDEX` there), so no block mixes two documents.
    """
    tokenizer = load_tokenizer(key.tokenizer)
    pad = tokenizer.pad_token_id
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    blocks: list[list[int]] = []
    owners: list[int] = []
    for document, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        ids = ids + eos
        for start in range(0, len(ids), key.max_length):
            blocks.append(ids[start : start + key.max_length])
            owners.append(document)
    x = torch.full((len(blocks), key.max_length), pad, dtype=torch.long)
    y = torch.full((len(blocks), key.max_length), IGNORE_INDEX, dtype=torch.long)
    for row, block in enumerate(blocks):
        x[row, : len(block)] = torch.tensor(block)
        y[row, : len(block)] = x[row, : len(block)]
    return x, y, np.asarray(owners, dtype=np.int64)


def load_brown_data(key: DataKey) -> RawData:
    """The Brown corpus (:mod:`fedqsn_flwr.app.brown`) as causal-LM blocks of whole documents."""
    if not key.tokenizer:
        raise DataError(
            "dataset 'brown' is for causal language models: set model = 'hf:<folder>' (a "
            "GPT-2-style checkpoint or architecture with its tokenizer, e.g. the one "
            "fedqsn-brown-gpt2 writes)"
        )
    documents = load_brown(key.data_dir)
    x, y, owners = lm_blocks([d.text for d in documents], key)
    spec = InputSpec("text", (key.max_length,), 0, len(load_tokenizer(key.tokenizer)), CAUSAL_LM)
    return RawData(x, y, None, None, spec, owners, tuple(d.genre for d in documents))


# -- images -----------------------------------------------------------------------


def _torchvision_cifar(name: str, trust: bool) -> type:
    """Torchvision's CIFAR reader: checksums checked, or (``trust``) files only.

    CIFAR's "python version" files are pickles, and unpickling runs code: by
    default torchvision's MD5 check of the official files comes first, so only
    those are ever unpickled. ``trust-data-dir`` skips it, for a folder you made
    or converted yourself (and trust like your own code).
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100
    if not trust:
        return base

    class LocalCIFAR(base):  # type: ignore[misc, valid-type]
        """torchvision's CIFAR reader; files must exist, checksums are not required.

        torchvision checks the MD5 of the official archive's files; a copy
        converted or cut down by the user (or a test's tiny file) has others.
        """

        meta = {**base.meta, "md5": None}  # None: torchvision checks existence only

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    return LocalCIFAR


def load_torchvision(key: DataKey) -> RawData:
    """MNIST, Fashion-MNIST, CIFAR-10/100 from ``key.data_dir`` with torchvision, offline."""
    from torchvision.datasets import MNIST, FashionMNIST

    root = str(Path(key.data_dir).expanduser())
    classes: dict[str, Any] = {
        "mnist": MNIST,
        "fashion-mnist": FashionMNIST,
        "cifar10": None,
        "cifar100": None,
    }
    reader = classes[key.dataset] or _torchvision_cifar(key.dataset, key.trust_data_dir)
    try:
        train = reader(root, train=True, download=False)
        test = reader(root, train=False, download=False)
    except RuntimeError as err:
        checksums = (
            "; CIFAR files must match torchvision's checksums unless you set "
            "trust-data-dir = true (the files are pickles: only for a folder you trust)"
            if key.dataset.startswith("cifar") and not key.trust_data_dir
            else ""
        )
        raise DataError(
            f"dataset '{key.dataset}' not found under data-dir '{root}' ({err}); "
            "see docs/configuration.md (Data sets and models) for the folder layout "
            f"torchvision expects{checksums}"
        ) from err

    def images(ds: Any) -> torch.Tensor:
        data = torch.as_tensor(np.asarray(ds.data))
        # MNIST-style (N, H, W) grey, CIFAR (N, H, W, C) colour -> (N, C, H, W)
        return data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2).contiguous()

    def labels(ds: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)

    train_x, test_x = images(train), images(test)
    num_classes = 100 if key.dataset == "cifar100" else 10
    return RawData(
        train_x.to(torch.uint8),
        labels(train),
        test_x.to(torch.uint8),
        labels(test),
        InputSpec("image", tuple(train_x.shape[1:]), num_classes),
    )


def _pil_to_array(image: Any) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_flwr_datasets(key: DataKey) -> RawData:
    """A Hugging Face data set through flwr-datasets' ``FederatedDataset``."""
    from flwr_datasets import FederatedDataset

    info = HF_DATASETS[key.dataset]
    try:
        # Our own seeded split follows; keep the data set's order here.
        dataset = FederatedDataset(dataset=info["id"], partitioners={"train": 1}, shuffle=False)
        train = dataset.load_split("train")
        test = dataset.load_split(info["test"])
    except Exception as err:  # network, cache, or format problems all end here
        raise DataError(
            f"cannot load '{key.dataset}' ({info['id']}) through flwr-datasets: {err}. "
            "Offline, set data-dir to a local copy (images: torchvision layout; text: "
            "dataset = 'text' with train.csv/jsonl)"
        ) from err
    if key.dataset in TEXT_DATASETS:
        return _text_data(
            (list(train[info["x"]]), None, list(train[info["y"]])),
            (list(test[info["x"]]), None, list(test[info["y"]])),
            key,
        )

    def images(split: Any) -> torch.Tensor:
        return torch.from_numpy(np.stack([_pil_to_array(im) for im in split[info["x"]]]))

    train_x, test_x = images(train), images(test)
    train_y = torch.tensor(train[info["y"]], dtype=torch.long)
    test_y = torch.tensor(test[info["y"]], dtype=torch.long)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return RawData(
        train_x, train_y, test_x, test_y, InputSpec("image", tuple(train_x.shape[1:]), num_classes)
    )


def load_digits_data() -> RawData:
    """scikit-learn's digits, standardized float32 (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor((digits.images / 16.0 - DIGITS_MEAN) / DIGITS_STD, dtype=torch.float32)
    return RawData(
        x.unsqueeze(1),
        torch.tensor(digits.target, dtype=torch.long),
        None,
        None,
        InputSpec("image", (1, 8, 8), 10),
    )


def generate_mnist1d(
    num_examples: int, seed: int | np.random.Generator, shear_scale: float = 0.75
) -> RawData:
    """``num_examples`` MNIST-1D signals (N, 1, 40) from ``mnist1d.data.make_dataset``.

    ``seed``: a public integer (the package reduces it to 32 bits: for data
    every client may compute, such as the client pool) or a numpy ``Generator``
    (the server's own examples: :func:`fedqsn_flwr.core.secret.secret_rng`), which
    fills numpy's and Python's global Mersenne Twisters in full instead of the
    package's ``set_seed``. Offline: ``make_dataset`` generates (``get_dataset``
    would try a download, so it is never called). The global generators' states
    are put back afterwards. Each generated set is standardised with its own
    statistics, as the package does. ``shear_scale`` 0.75 is the package's
    default generator.
    """
    import random

    try:
        import mnist1d.data as mnist1d_data
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise DataError(
            "dataset 'mnist1d' needs the mnist1d package (pip install mnist1d)"
        ) from err
    if num_examples < 10:
        raise DataError(f"MNIST-1D needs at least 10 examples (one per class), got {num_examples}")
    args = mnist1d_data.get_dataset_args()
    args.num_samples = int(num_examples)
    args.train_split = 1.0
    args.shear_scale = float(shear_scale)
    package_set_seed = mnist1d_data.set_seed
    if isinstance(seed, np.random.Generator):
        words = seed.integers(0, 2**32, size=(2, 624), dtype=np.uint64)

        def set_full_state(_: Any) -> None:
            # MT19937's whole state (624 words), not the 32 bits set_seed keeps
            np.random.set_state(("MT19937", words[0].astype(np.uint32), 624, 0, 0.0))
            random.setstate((3, (*(int(w) for w in words[1]), 624), None))

        mnist1d_data.set_seed = set_full_state
        args.seed = 0  # unused
    else:
        args.seed = int(seed) % 2**32
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        generated = mnist1d_data.make_dataset(args)
    finally:
        mnist1d_data.set_seed = package_set_seed
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x = torch.tensor(generated["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(generated["y"], dtype=torch.long)
    return RawData(x, y, None, None, InputSpec("signal", (1, MNIST1D_LENGTH), 10))


def _user_loader(key: DataKey) -> Any:
    try:
        return load_factory(key.dataset, "dataset")
    except ValueError as err:
        raise DataError(str(err)) from err


def is_partition_loader(key: DataKey) -> bool:
    """Whether ``key`` names a user loader that returns one client's partition."""
    if ":" not in key.dataset:
        return False
    return "partition_id" in inspect.signature(_user_loader(key)).parameters


def load_user_partition(
    key: DataKey, partition_id: int, num_partitions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's ``(x, y)`` from a partition loader (see the module docstring)."""
    loader = _user_loader(key)
    kwargs: dict[str, Any] = {"data_dir": key.data_dir, "seed": 0, "partition_id": partition_id}
    if "num_partitions" in inspect.signature(loader).parameters:
        kwargs["num_partitions"] = num_partitions
    result = loader(**kwargs)
    if not isinstance(result, tuple) or len(result) != 2:
        raise DataError(
            f"partition loader '{key.dataset}' must return (x, y) for partition "
            f"{partition_id}; got {type(result).__name__}"
        )
    return torch.as_tensor(result[0]), torch.as_tensor(result[1]).long()


def _from_user(key: DataKey) -> RawData:
    loader = _user_loader(key)
    kwargs: dict[str, Any] = {"data_dir": key.data_dir, "seed": 0}
    if "partition_id" in inspect.signature(loader).parameters:
        kwargs["partition_id"] = None  # the server's own data
    result = loader(**kwargs)
    if isinstance(result, RawData):
        return result
    if not isinstance(result, tuple) or len(result) not in (2, 4):
        raise DataError(
            f"dataset loader '{key.dataset}' must return RawData, (x, y) or "
            f"(x_train, y_train, x_test, y_test); got {type(result).__name__}"
        )
    tensors = [torch.as_tensor(t) for t in result]
    train_x, train_y = tensors[0], tensors[1].long()
    test_x, test_y = (tensors[2], tensors[3].long()) if len(tensors) == 4 else (None, None)
    labels = train_y if test_y is None else torch.cat([train_y, test_y])
    num_classes = int(labels.max()) + 1
    if train_x.dtype == torch.long and train_x.dim() == 2:
        highest = train_x.max() if test_x is None else max(train_x.max(), test_x.max())
        vocab = int(highest) + 1
        spec = InputSpec("text", (train_x.shape[1],), num_classes, vocab)
    else:
        spec = InputSpec("image", tuple(train_x.shape[1:]), num_classes)
    return RawData(train_x, train_y, test_x, test_y, spec)


def load_raw(key: DataKey) -> RawData:
    """The examples ``key`` names (see the module docstring)."""
    if ":" in key.dataset:
        return _from_user(key)
    if key.dataset == "digits":
        return load_digits_data()
    if key.dataset == "text":
        return load_text_files(key)
    if key.dataset.startswith("glue/") and key.dataset in GLUE_E2E_DATASETS:
        return load_glue(key)
    if key.dataset == "e2e_nlg":
        return load_e2e(key)
    if key.dataset == "brown":
        return load_brown_data(key)
    if key.dataset in IMAGE_DATASETS and key.data_dir:
        return load_torchvision(key)
    if key.dataset in HF_DATASETS:
        return load_flwr_datasets(key)
    raise DataError(
        f"unknown dataset '{key.dataset}'; allowed: {list(DATASETS)} or 'package.module:loader'"
    )
