"""The package's layers, and that the library installs without the app's extras."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedqsn_flwr"
#: Each layer may import the layers before it, never those after it.
LAYERS = ["core", "flower", "app", "experiments"]
#: Packages only the app, the experiment tools or the benchmark need (extras).
EXTRAS_ONLY = [
    "matplotlib",
    "psutil",
    "sklearn",
    "torchvision",
    "yaml",
    "flwr_datasets",
    "mnist1d",
    "bitsandbytes",
    "ray",
    "transformers",
    "tokenizers",
]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_the_layers_below_them(layer):
    later = LAYERS[LAYERS.index(layer) + 1 :]
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(path):
            for other in later:
                assert not name.startswith(f"fedqsn_flwr.{other}"), f"{path} imports {name}"
            if layer == "core":
                assert not name.startswith("flwr"), f"{path} (algorithm) imports {name}"


def test_the_flower_layer_leaves_the_kernels_to_core():
    # backend choice (numba or torch) is core's: flower/ calls core's functions only
    for path in sorted((PACKAGE / "flower").rglob("*.py")):
        assert "fedqsn_flwr.core.kernels" not in _imports(path), path
        assert "from fedqsn_flwr.core import kernels" not in path.read_text(), path


def _app_depth() -> dict[str, int]:
    """Per app module, its floor: 1 + the highest floor of the app modules it imports."""
    imports = {
        path.stem: {
            n.rsplit(".", 1)[-1] for n in _imports(path) if n.startswith("fedqsn_flwr.app.")
        }
        for path in (PACKAGE / "app").glob("*.py")
    }
    floors: dict[str, int] = {}

    def floor(name: str, seen: tuple[str, ...] = ()) -> int:
        assert name not in seen, f"import cycle {seen + (name,)}"
        if name not in floors:
            below = [floor(d, seen + (name,)) for d in imports[name] if d in imports]
            floors[name] = 1 + max(below, default=0)
        return floors[name]

    for name in imports:
        floor(name)
    return floors


def test_the_app_has_a_ground_floor_and_few_floors():
    floors = _app_depth()
    assert floors["base"] == 1  # imports nothing of the app: every module may use it
    assert floors["config"] <= 2  # allowed names come from the ground floor
    assert max(floors.values()) <= 6, floors


def test_top_level_package_is_the_library_only():
    for name in _imports(PACKAGE / "__init__.py"):
        assert name.startswith(("fedqsn_flwr.core", "fedqsn_flwr.flower")), name


def test_library_installs_without_the_app_and_experiment_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    extras = ("matplotlib", "psutil", "scikit-learn", "torchvision", "pyyaml", "bitsandbytes")
    for extra in (*extras, "transformers"):
        assert extra not in base, extra
    assert {"app", "experiments", "bench", "dev", "hf"} <= set(project["optional-dependencies"])


def test_the_installed_library_pins_nothing_exactly():
    """The library's own requirements are ranges: it installs beside any Flower app.

    Read from the installed metadata (what pip resolves against), not the source.
    """
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    library = [Requirement(r) for r in requires("fedqsn-flwr") or [] if "extra ==" not in r]
    assert {r.name for r in library} >= {"flwr", "torch", "numpy", "numba"}
    for requirement in library:
        exact = [s for s in requirement.specifier if s.operator in ("==", "===", "~=")]
        assert not exact, f"{requirement}: an exact pin belongs to the app extra"
    by_name = {r.name: r.specifier for r in library}
    # the torch of Flower's quickstart-pytorch (2.8.0) and this project's pin (2.14.1)
    assert by_name["torch"].contains("2.8.0") and by_name["torch"].contains("2.14.1")
    assert by_name["flwr"].contains("1.42.0") and not by_name["flwr"].contains("1.41.0")


@pytest.mark.slow  # a fresh Python process
def test_library_imports_and_runs_with_the_extras_missing():
    """Import the library and build a FedQSN round with every extra-only package blocked."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS_ONLY!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
import fedqsn_flwr
from fedqsn_flwr import FedQSN, freeze_hidden, load_received, policy_for_model, train_reply
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
strategy = FedQSN(policy_for_model(model), min_train_nodes=1, min_available_nodes=1)
class Grid:
    def get_node_ids(self): return [5]
    def send_and_receive(self, messages, timeout=None): return []
message = strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), Grid())[0]
received = load_received(model, message.content)
with freeze_hidden(model, received):
    model(torch.ones(2, 4)).sum().backward()
reply = train_reply(message, model, received, num_examples=2)
loaded = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in {EXTRAS_ONLY!r})
print("ok", loaded)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok []" in done.stdout
