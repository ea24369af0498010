import tomllib
from pathlib import Path

import pytest
import torch

from fedqsn_flwr.app.config import DEFAULTS, SPEC, ConfigError, resolve, validate

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_match_the_spec():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == DEFAULTS


def test_required_keys_exist():
    required = {
        "strategy",
        "num-server-rounds",
        "fraction-train",
        "local-epochs",
        "learning-rate",
        "batch-size",
        "server-mask-ratio",
        "client-mask-ratio",
        "bit-width",
        "block-size",
        "dataset",
        "partitioning",
        "dirichlet-alpha",
        "model",
        "seed",
        "output-dir",
    }
    assert required <= set(SPEC)
    assert DEFAULTS["strategy"] == "fedqsn"


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("server-mask-ratio", 1.0, "[0, 1)"),
        ("server-mask-ratio", -0.1, "[0, 1)"),
        ("client-mask-ratio", 1.5, "[0, 1)"),
        ("bit-width", 1, "2..8"),
        ("bit-width", 9, "2..8"),
        ("block-size", 0, ">= 1"),
        ("strategy", "fedfoo", "['fedqsn', 'fedsn', 'fedq', 'fedavg', 'fedprox']"),
        ("dataset", "imagenet", "'digits', 'mnist1d', 'mnist'"),
        ("model", "gpt", "'cnn', 'cnn1d', 'mlp', 'mlp512', 'resnet18', 'transformer'"),
        ("partitioning", "shards", "['iid', 'dirichlet', 'genre']"),
        ("num-server-rounds", 0, ">= 1"),
        ("dirichlet-alpha", 0.0, "> 0"),
        ("bit-width", "four", "2..8"),
        ("seed", 2**64, "0..9223372036854775807"),
        ("seed", -1, "0..9223372036854775807"),
        ("learning-rate", float("inf"), "finite number > 0"),
        ("learning-rate", float("nan"), "finite number > 0"),
        ("max-update-norm-ratio", float("inf"), "finite number >= 0"),
        ("run-name", "..", "not '.' or '..'"),
        ("run-name", ".", "not '.' or '..'"),
        ("run-name", "a\x00b", "no control characters"),
        ("run-name", "a/b", "no '/'"),
    ],
)
def test_invalid_values_name_the_key_and_the_allowed_values(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        resolve({}, ROOT, {key: value})
    assert f"'{key}'" in str(err.value) and allowed in str(err.value)


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key"):
        resolve({"bits": 4}, ROOT)


def test_precedence_defaults_preset_run_config_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("bit-width: 3\nseed: 5\nmodel: mlp\n")
    run_config = {**DEFAULTS, "config": str(preset), "seed": 9}
    config = resolve(run_config, ROOT, {"model": "cnn"})
    assert config["bit-width"] == 3  # from the preset
    assert config["seed"] == 9  # --run-config beats the preset
    assert config["model"] == "cnn"  # Python overrides beat everything
    assert config["block-size"] == DEFAULTS["block-size"]


def test_presets_in_configs_are_valid():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets
    for preset in presets:
        resolve({}, ROOT, {"config": f"configs/{preset.name}"})


@pytest.mark.parametrize(
    "text, match",
    [
        (None, "cannot read"),
        ("a: [1, 2", "not valid YAML"),
        ("- 1\n- 2\n", "mapping"),
        ("bits: 4\n", "unknown key"),
    ],
)
def test_bad_presets_get_a_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        resolve({}, ROOT, {"config": str(path)})


def test_integer_given_for_a_float_key_is_accepted():
    assert resolve({}, ROOT, {"learning-rate": 1})["learning-rate"] == 1.0


def test_configuration_doc_holds_the_current_generated_key_table():
    from fedqsn_flwr.app.config import markdown_table, with_table

    document = (ROOT / "docs" / "configuration.md").read_text()
    assert with_table(document) == document, "run: python -m fedqsn_flwr.app.config"
    for key in SPEC:
        assert f"| `{key}` |" in markdown_table(), key


def test_pyproject_components_are_the_root_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    import client_app
    import server_app

    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server_app:app", "clientapp": "client_app:app"}
    assert isinstance(server_app.app, ServerApp) and isinstance(client_app.app, ClientApp)


def test_device_key_is_checked_and_auto_picks_what_exists():
    from fedqsn_flwr.app.training import pick_device

    for bad in ("gpu", "cuda:x", "CPU", ""):
        with pytest.raises(ConfigError, match="device"):
            validate({**DEFAULTS, "device": bad})
    assert validate({**DEFAULTS, "device": "cuda:1"})["device"] == "cuda:1"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_update_bit_width_key_allows_32_16_and_nf_bits():
    for good in (32, 16, 2, 8):
        assert validate({**DEFAULTS, "update-bit-width": good})["update-bit-width"] == good
    for bad in (1, 9, 12, 64):
        with pytest.raises(ConfigError, match="update-bit-width"):
            validate({**DEFAULTS, "update-bit-width": bad})
