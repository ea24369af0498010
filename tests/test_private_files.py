"""The run folder and what the server keeps are its owner's alone, whatever the umask."""

import os
import stat

import pytest
import torch

from fedqsn_flwr.app.config import validate
from fedqsn_flwr.app.private import private_dir, private_open, save_private, write_private
from fedqsn_flwr.app.server import run_server
from tests.helpers import LocalGrid


@pytest.fixture
def umask_022():
    """The usual umask, under which plain open() and mkdir() make world-readable files."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_a_run_leaves_only_owner_readable_folders_and_files(base_config, tmp_path, umask_022):
    outputs = tmp_path / "made" / "outputs"  # neither exists: the app creates both
    config = validate(
        {
            **base_config,
            "output-dir": str(outputs),
            "run-name": "private",
            "num-server-rounds": 2,
            "min-nodes": 3,
            "fraction-evaluate": 1.0,
            "save-messages": True,
            "pretrain-cache": True,
        }
    )
    run_server(LocalGrid(3, config), config)
    run = outputs / "private"
    files = {p.relative_to(outputs).as_posix(): _mode(p) for p in outputs.rglob("*") if p.is_file()}
    folders = {
        p.relative_to(tmp_path).as_posix(): _mode(p) for p in outputs.rglob("*") if p.is_dir()
    }
    folders |= {"made": _mode(tmp_path / "made"), "made/outputs": _mode(outputs)}
    for name in ("checkpoint.pt", "final_model.pt", "server-secret", "config.yaml", "metrics.csv"):
        assert f"private/{name}" in files
    assert any(n.startswith("private/received/round-001/train-") for n in files)
    assert any(n.startswith(".pretrained/") for n in files)
    assert {n: m for n, m in files.items() if m != 0o600} == {}
    assert {n: m for n, m in folders.items() if m != 0o700} == {}
    assert run.is_dir()


def test_a_users_own_output_dir_keeps_its_mode_and_the_run_folder_is_private(
    base_config, tmp_path, umask_022
):
    outputs = tmp_path / "mine"
    outputs.mkdir(mode=0o755)
    config = validate(
        {**base_config, "output-dir": str(outputs), "run-name": "r", "num-server-rounds": 1}
    )
    run_server(LocalGrid(3, config), config)
    assert _mode(outputs) == 0o755
    assert _mode(outputs / "r") == 0o700
    assert _mode(outputs / "r" / "final_model.pt") == 0o600


def test_helpers_restrict_files_and_folders_that_existed_wider(tmp_path, umask_022):
    folder = tmp_path / "run"
    folder.mkdir(mode=0o755)
    old = folder / "metrics.csv"
    old.write_text("round\n")
    os.chmod(old, 0o644)
    private_dir(folder)
    with private_open(old, "a") as handle:
        handle.write("1\n")
    write_private(folder / "config.yaml", "a: 1\n")
    save_private({"w": torch.ones(2)}, folder / "model.pt")
    assert _mode(folder) == 0o700
    assert {p.name: _mode(p) for p in folder.iterdir()} == {
        "metrics.csv": 0o600,
        "config.yaml": 0o600,
        "model.pt": 0o600,
    }
    assert old.read_text() == "round\n1\n"
    assert torch.equal(torch.load(folder / "model.pt")["w"], torch.ones(2))
