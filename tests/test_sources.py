"""Every data source, loaded offline from tiny files written here in the real formats."""

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedqsn_flwr.app import sources as datasets
from fedqsn_flwr.app.sources import DataError, DataKey, load_raw, tokenize
from fedqsn_flwr.app.splits import input_spec, load_client_data, load_server_data
from tests.helpers import TEST_SECRET, client_split


def _idx(path, array, code):
    """Write ``array`` in the IDX format MNIST ships in (big-endian header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist_folder(root, folder, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x08)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 0x08)
    return rng


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_style_idx_files_load_through_torchvision(tmp_path, name, folder):
    _mnist_folder(tmp_path, folder)
    raw = load_raw(DataKey(name, data_dir=str(tmp_path)))
    assert raw.train_x.shape == (12, 1, 28, 28) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (5, 1, 28, 28)
    assert raw.train_y.tolist() == [i % 10 for i in range(12)]
    assert raw.spec.shape == (1, 28, 28) and raw.spec.num_classes == 10
    # the pixels are the file's bytes
    first = (tmp_path / folder / "raw" / "train-images-idx3-ubyte").read_bytes()[16 : 16 + 784]
    assert raw.train_x[0, 0].flatten().tolist() == list(first)


def _pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def test_cifar10_python_batches_load_through_torchvision(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        batches.append(data)
        _pickle(folder / f"data_batch_{i}", {"data": data, "labels": [i % 10, 2, 3]})
    _pickle(
        folder / "test_batch",
        {"data": rng.integers(0, 256, (4, 3072), np.uint8), "labels": [1] * 4},
    )
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    raw = load_raw(DataKey("cifar10", data_dir=str(tmp_path), trust_data_dir=True))
    assert raw.train_x.shape == (15, 3, 32, 32) and raw.test_x.shape == (4, 3, 32, 32)
    # CIFAR rows are R plane, G plane, B plane of a 32x32 image
    assert torch.equal(raw.train_x[0], torch.from_numpy(batches[0][0].reshape(3, 32, 32)))
    assert raw.spec.num_classes == 10 and raw.spec.shape == (3, 32, 32)


def test_cifar100_python_files_load_through_torchvision(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    _pickle(
        folder / "train",
        {"data": rng.integers(0, 256, (6, 3072), np.uint8), "fine_labels": [0, 5, 99, 1, 2, 3]},
    )
    _pickle(
        folder / "test", {"data": rng.integers(0, 256, (2, 3072), np.uint8), "fine_labels": [7, 8]}
    )
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    raw = load_raw(DataKey("cifar100", data_dir=str(tmp_path), trust_data_dir=True))
    assert raw.train_x.shape == (6, 3, 32, 32) and raw.train_y.tolist() == [0, 5, 99, 1, 2, 3]
    assert raw.spec.num_classes == 100


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned-by-cifar",))


def test_cifar_files_are_checked_before_unpickling_unless_trusted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        _pickle(folder / name, _RunsCode())
    with pytest.raises(DataError, match="trust-data-dir"):
        load_raw(DataKey("cifar10", data_dir=str(tmp_path)))
    assert not (tmp_path / "pwned-by-cifar").exists()


def test_missing_local_copy_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match="data-dir"):
        load_raw(DataKey("mnist", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="train.csv or train.jsonl"):
        load_raw(DataKey("text", data_dir=str(tmp_path)))


def _text_files(folder, n=40):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        ("a great, fine movie" if i % 2 else "an awful bad film", "pos" if i % 2 else "neg")
        for i in range(n)
    ]
    with (folder / "train.csv").open("w") as handle:
        handle.write("text,label\n")
        for text, label in rows:
            handle.write(f'"{text}",{label}\n')
    with (folder / "test.jsonl").open("w") as handle:
        for text, label in rows[:6]:
            handle.write(json.dumps({"text": text, "label": label}) + "\n")


def test_text_csv_and_jsonl_are_tokenized_without_a_vocabulary(tmp_path):
    _text_files(tmp_path)
    raw = load_raw(DataKey("text", data_dir=str(tmp_path), vocab_size=100, max_length=6))
    assert raw.train_x.shape == (40, 6) and raw.train_x.dtype == torch.long
    assert raw.test_x.shape == (6, 6)
    assert raw.train_y.tolist()[:4] == [0, 1, 0, 1]  # 'neg' < 'pos'
    assert raw.spec.kind == "text" and raw.spec.vocab_size == 100 and raw.spec.num_classes == 2
    assert int(raw.train_x.max()) < 100 and int(raw.train_x.min()) >= 0
    # same words, same ids; padding is 0; case and punctuation do not matter
    ids = tokenize(["Great, FINE", "great fine", ""], 100, 4)
    assert torch.equal(ids[0], ids[1]) and ids[0, 2:].eq(0).all() and ids[2].eq(0).all()


def test_text_rows_without_label_are_refused(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "no label"}) + "\n")
    with pytest.raises(DataError, match=r"row 1 has no \['label'\]"):
        load_raw(DataKey("text", data_dir=str(tmp_path)))


def test_flwr_datasets_path_loads_images_and_text(tmp_path, monkeypatch):
    """The FederatedDataset code path, pointed at local parquet/CSV files instead of the Hub."""
    import datasets as hf
    from PIL import Image

    monkeypatch.setattr(hf.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "hub-mnist"
    images.mkdir()
    rng = np.random.default_rng(3)
    features = hf.Features({"image": hf.Image(), "label": hf.Value("int64")})
    for split, n in (("train", 8), ("test", 3)):
        pictures = [
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)
        ]
        table = hf.Dataset.from_dict(
            {"image": pictures, "label": list(range(n))}, features=features
        )
        table.to_parquet(str(images / f"{split}.parquet"))
    text = tmp_path / "hub-news"
    text.mkdir()
    for split in ("train", "test"):
        (text / f"{split}.csv").write_text("text,label\nstocks rise,2\nteam wins,1\nnew chip,3\n")
    monkeypatch.setitem(datasets.HF_DATASETS["mnist"], "id", str(images))
    monkeypatch.setitem(datasets.HF_DATASETS["ag-news"], "id", str(text))

    raw = load_raw(DataKey("mnist"))
    assert raw.train_x.shape == (8, 1, 28, 28) and raw.test_x.shape == (3, 1, 28, 28)
    assert raw.train_y.tolist() == list(range(8))
    news = load_raw(DataKey("ag-news", max_length=4))
    assert news.train_x.shape == (3, 4) and news.train_y.tolist() == [2, 1, 3]
    assert news.spec.num_classes == 4


def test_flwr_datasets_without_network_explains_the_offline_option(monkeypatch):
    monkeypatch.setitem(datasets.HF_DATASETS["cifar10"], "id", "no-such-owner/no-such-set")
    with pytest.raises(DataError, match="data-dir"):
        load_raw(DataKey("cifar10"))


def test_own_test_split_becomes_the_server_test_set_and_images_are_standardized(tmp_path):
    _mnist_folder(tmp_path, "MNIST", n_train=40, n_test=7)
    key = DataKey("mnist", data_dir=str(tmp_path))
    server = load_server_data(
        key, seed=0, test_fraction=0.2, pretrain_fraction=0.25, secret=TEST_SECRET
    )
    assert len(server.test) == 7 and len(server.pretrain) == 10 and len(server.pool) == 30
    batch = server.pool.inputs(slice(0, 30))
    assert batch.dtype == torch.float32 and abs(float(batch.mean())) < 0.2
    assert abs(float(batch.std()) - 1) < 0.2
    train, evaluation = client_split(key, 0, 0.2, 0.25, 1, 3)
    assert len(train) + len(evaluation) == 10 and train.x.dtype == torch.uint8
    assert input_spec(key).shape == (1, 28, 28)


def test_a_users_loader_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        "import torch\n"
        "def load(data_dir, seed):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.rand(30, 2, 5, 5, generator=g), torch.arange(30) % 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = load_raw(DataKey("my_data:load"))
    assert raw.spec.shape == (2, 5, 5) and raw.spec.num_classes == 3
    with pytest.raises(DataError, match="callable"):
        load_raw(DataKey("my_data:missing"))


def test_a_users_partition_loader_gives_each_client_its_own_data(
    tmp_path, monkeypatch, base_config
):
    """Each node loads only its own partition; the server gets its own test/pretraining data."""
    from fedqsn_flwr.app.config import validate
    from fedqsn_flwr.app.models import build_model
    from fedqsn_flwr.app.server import build_strategy, train_config
    from tests.helpers import TEST_SECRET, LocalGrid

    (tmp_path / "my_parts.py").write_text(
        "import torch\n"
        "def load(data_dir, seed, partition_id=None, num_partitions=None):\n"
        "    g = torch.Generator().manual_seed(0 if partition_id is None else 100 + partition_id)\n"
        "    if partition_id is None:\n"
        "        return (torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 10,\n"
        "                torch.randn(20, 1, 8, 8, generator=g), torch.arange(20) % 10)\n"
        "    n = 10 + 5 * partition_id\n"
        "    return torch.full((n, 1, 8, 8), float(partition_id)), torch.full((n,), partition_id)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    key = DataKey("my_parts:load")
    server = load_server_data(
        key, seed=0, test_fraction=0.2, pretrain_fraction=0.1, secret=TEST_SECRET
    )
    assert len(server.test) == 20 and len(server.pretrain) == 40 and len(server.pool) == 0
    for partition in range(3):
        train, evaluation = load_client_data(
            key, seed=0, partition_id=partition, num_partitions=3, partitioning="iid", alpha=0.5
        )
        assert len(train) + len(evaluation) == 10 + 5 * partition
        assert train.y.eq(partition).all() and train.x.eq(float(partition)).all()
    # and a federation runs on it
    config = validate(
        {
            **base_config,
            "dataset": "my_parts:load",
            "min-nodes": 3,
            "fraction-evaluate": 0.0,
            "pretrain-epochs": 1,
        }
    )
    model = build_model("cnn")
    strategy = build_strategy(config, model, None, server_secret=TEST_SECRET)
    result = strategy.start(
        LocalGrid(3, config),
        ArrayRecord(model.state_dict()),
        num_rounds=1,
        train_config=train_config(config),
    )
    assert strategy.round_log[1]["num_aggregated"] == 3 and len(result.arrays) > 0
