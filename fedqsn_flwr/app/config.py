"""Run configuration: defaults, YAML presets, validation.

Every key lives in ``[tool.flwr.app.config]`` of ``pyproject.toml`` with the same
default as :data:`SPEC` (a test keeps the two equal). Values are resolved, from
lowest to highest precedence, as

1. the defaults;
2. a YAML preset named by the ``config`` key (path relative to the project);
3. keys given with ``flwr run . --run-config "k=v ..."`` -- that is, run-config
   values that differ from the defaults;
4. explicit overrides passed from Python (tests, the comparison tool).

Every value is checked before any training; a bad one raises :class:`ConfigError`
naming the key and what it allows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedqsn_flwr.app.base import (
    DATASETS,
    DEVICE_PATTERN,
    LANGUAGE_MODELLING,
    MODEL_NAMES,
    OPTIMIZERS,
    PARTITIONINGS,
    is_factory_path,
    is_hf,
)
from fedqsn_flwr.core.quantization import MAX_BIT_WIDTH, MIN_BIT_WIDTH
from fedqsn_flwr.flower.proxy import UPDATE_BIT_WIDTHS

STRATEGIES = ("fedqsn", "fedsn", "fedq", "fedavg", "fedprox")

Config = dict[str, Any]


class ConfigError(ValueError):
    """A configuration value or preset that cannot be used."""


@dataclass(frozen=True)
class Key:
    """One run-config key: its default, its type, what it allows, what it means."""

    default: Any
    kind: type
    allowed: str
    check: Callable[[Any], bool]
    meaning: str


def _choice(default: str, options: tuple[str, ...] | list[str], meaning: str) -> Key:
    return Key(default, str, f"one of {list(options)}", lambda v: v in options, meaning)


#: The largest integer a key takes (Flower's run config holds int64; seeds are 63-bit).
MAX_INTEGER = 2**63 - 1


def _integer(default: int, low: int, meaning: str) -> Key:
    return Key(
        default,
        int,
        f"an integer in {low}..{MAX_INTEGER}" if low == 0 else f"an integer >= {low}",
        lambda v: low <= v <= MAX_INTEGER,
        meaning,
    )


def _run_name_ok(name: str) -> bool:
    """A single folder name: no separator, not . or .., no control character."""
    return (
        "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and all(ord(c) >= 32 and ord(c) != 127 for c in name)
    )


def _positive(default: float, meaning: str) -> Key:
    return Key(default, float, "a finite number > 0", lambda v: v > 0, meaning)


def _fraction(
    default: float,
    meaning: str,
    *,
    low: float = 0.0,
    high: float = 1.0,
    open_low: bool = False,
    open_high: bool = False,
) -> Key:
    def check(v: float) -> bool:
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return Key(default, float, f"a number in {interval}", check, meaning)


SPEC: dict[str, Key] = {
    "strategy": _choice(
        "fedqsn", STRATEGIES, "fedqsn, masks only (fedsn), quantization only (fedq), or baselines"
    ),
    "num-server-rounds": _integer(10, 1, "federated rounds"),
    "fraction-train": _fraction(
        1.0, "share of connected nodes sampled for training each round", open_low=True
    ),
    "fraction-evaluate": _fraction(
        0.5, "share of nodes sampled to evaluate their proxy on local data"
    ),
    "min-nodes": _integer(2, 1, "nodes that must be connected (and sampled) before a round starts"),
    "round-timeout": _positive(600.0, "seconds to wait for replies in a round"),
    "max-num-examples": _integer(
        100_000, 1, "replies claiming more training (or evaluation) examples are rejected"
    ),
    "max-update-norm-ratio": Key(
        10.0,
        float,
        "a finite number >= 0 (0 = no bound)",
        lambda v: v >= 0,
        "reject updates whose norm exceeds this times the norm of the model the client was sent "
        "(FedQSN: its proxy, never the hidden part) or (3+ replies) the round's median update "
        "norm; 0 = off (every strategy)",
    ),
    "local-epochs": _integer(5, 1, "client epochs per round"),
    "learning-rate": _positive(0.05, "SGD learning rate (momentum 0.9), clients and pretraining"),
    "batch-size": _integer(32, 1, "batch size, clients and pretraining"),
    "proximal-mu": Key(
        0.01,
        float,
        "a finite number >= 0",
        lambda v: v >= 0,
        "weight of FedProx's proximal term in client training (strategy fedprox only)",
    ),
    "server-mask-ratio": _fraction(
        0.1, "p1: share of units the server hides for the whole run", open_high=True
    ),
    "client-mask-ratio": _fraction(
        0.1, "p2: share of server-visible units hidden per client per round", open_high=True
    ),
    "bit-width": Key(
        4,
        int,
        f"an integer in {MIN_BIT_WIDTH}..{MAX_BIT_WIDTH}",
        lambda v: MIN_BIT_WIDTH <= v <= MAX_BIT_WIDTH,
        "NormalFloat bits per proxy value",
    ),
    "block-size": _integer(64, 1, "values per absmax block"),
    "update-bit-width": Key(
        16,
        int,
        f"one of {list(UPDATE_BIT_WIDTHS)}",
        lambda v: v in UPDATE_BIT_WIDTHS,
        "client updates as float32 (32), float16 (16) or NF-k codes (2..8) (fedq/fedsn/fedqsn)",
    ),
    "hidden-feedback": Key(
        False,
        bool,
        "true or false",
        lambda v: isinstance(v, bool),
        "clients also return their loss gradient at hidden positions; the server steps its "
        "hidden units with it and a control variate from its own data (fedsn/fedqsn)",
    ),
    "feedback-examples": _integer(
        2000,
        1,
        "hidden-feedback: examples of the server's own data for the control variate, and as "
        "many others held out to guard each step (each half the pretraining set when smaller)",
    ),
    "proxy-evaluations": _integer(
        0,
        0,
        "fedqsn/fedsn: proxies per round scored on the test set for proxy_* in metrics.csv "
        "(the first built; 0 = all)",
    ),
    "feedback-tolerance": Key(
        0.02,
        float,
        "a finite number >= 0",
        lambda v: 0 <= v < float("inf"),
        "hidden-feedback: a step is kept only if it raises the loss on held-out server data by "
        "at most this fraction (else halved, up to 5 times, then dropped)",
    ),
    "feedback-step": _positive(
        1.0, "hidden-feedback: step on hidden units, in units of learning rate x local steps"
    ),
    "mask-input-layer": Key(
        False,
        bool,
        "true or false",
        lambda v: isinstance(v, bool),
        "also mask the first layer's input features (raw pixels)",
    ),
    "shared-residual-mask": Key(
        False,
        bool,
        "true or false",
        lambda v: isinstance(v, bool),
        "transformers: one mask of the residual stream for all its readers",
    ),
    "dataset": Key(
        "digits",
        str,
        f"one of {list(DATASETS)} or 'package.module:loader'",
        lambda v: v in DATASETS or is_factory_path(v),
        "data set (digits ships with scikit-learn; see Data sets and models)",
    ),
    "data-dir": Key(
        "",
        str,
        "empty or a folder path",
        lambda v: True,
        "local copy of the data set (torchvision layout; train.csv/jsonl: text, glue/*, e2e_nlg)",
    ),
    "mnist1d-server-examples": _integer(
        20_000, 10, "mnist1d: server pretraining examples (the package's default generator)"
    ),
    "mnist1d-client-examples": _integer(
        125, 2, "mnist1d: examples per client (20% kept for local evaluation)"
    ),
    "mnist1d-test-examples": _integer(4_000, 10, "mnist1d: server test examples"),
    "mnist1d-client-shear": Key(
        1.25,
        float,
        "a finite number >= 0",
        lambda v: v >= 0,
        "mnist1d: shear_scale of the clients' and the test generator (0.75 = the server's)",
    ),
    "trust-data-dir": Key(
        False,
        bool,
        "true or false",
        lambda v: isinstance(v, bool),
        "load local CIFAR files without torchvision's checksums (they are pickles: "
        "only for a folder you trust)",
    ),
    "vocab-size": _integer(8192, 2, "text: hash buckets of the tokenizer (token ids)"),
    "max-length": _integer(64, 1, "text: tokens per example (longer texts are cut)"),
    "partitioning": _choice("iid", PARTITIONINGS, "how the client pool is split across nodes"),
    "dirichlet-alpha": _positive(
        0.5, "label concentration for dirichlet partitioning (smaller = more skew)"
    ),
    "model": Key(
        "cnn",
        str,
        f"one of {sorted(MODEL_NAMES)}, 'hf:<checkpoint folder>' or 'package.module:factory'",
        lambda v: v in MODEL_NAMES or is_factory_path(v) or (is_hf(v) and len(v) > len("hf:")),
        "model architecture, or a local Hugging Face checkpoint (see Data sets and models)",
    ),
    "hf-weights": Key(
        True,
        bool,
        "true or false",
        lambda v: isinstance(v, bool),
        "hf:<folder>: the server starts from the folder's weights (false: the folder holds "
        "an architecture, config.json and tokenizer; the server initialises it from its secret)",
    ),
    "initial-model": Key(
        "",
        str,
        "empty or a state-dict file path (torch.save)",
        lambda v: True,
        "the server's starting weights; pretraining (if any) continues from them",
    ),
    "optimizer": _choice(
        "sgd", OPTIMIZERS, "client and pretraining optimizer: SGD (momentum 0.9) or AdamW"
    ),
    "dropout": _fraction(
        0.2, "dropout on the masked hidden features (pretraining and clients)", open_high=True
    ),
    "pretrain-epochs": _integer(
        30, 0, "server pretraining epochs on its private split (0 = from scratch)"
    ),
    "pretrain-cache": Key(
        True,
        bool,
        "true or false",
        lambda v: isinstance(v, bool),
        "keep pretrained starting models in <output-dir>/.pretrained (keyed by the secret "
        "and the settings) so runs that share them pretrain once",
    ),
    "test-fraction": _fraction(
        0.2, "share of the data held by the server as its test set", high=0.5, open_low=True
    ),
    "pretrain-fraction": _fraction(
        0.1, "share of the data private to the server for pretraining", high=0.5
    ),
    "seed": _integer(
        42,
        0,
        "public seed: sampling, client training, MNIST-1D's client pool (clients see it)",
    ),
    "server-secret-file": Key(
        "",
        str,
        "empty or a file path the ServerApp can read",
        lambda v: True,
        "opt-in reproducible server secret (masks, server split, init); empty = fresh random "
        "bytes per run (or env FEDQSN_SERVER_SECRET); see Server secret",
    ),
    "device": Key(
        "auto",
        str,
        "auto, cpu, cuda or cuda:<index>",
        lambda v: DEVICE_PATTERN.fullmatch(v) is not None,
        "where proxies are built, updates aggregated and models trained (auto: cuda if present)",
    ),
    "output-dir": Key(
        "~/fedqsn-outputs",
        str,
        "a directory path",
        lambda v: bool(v.strip()),
        "where run folders are written (relative paths: under your home)",
    ),
    "save-messages": Key(
        True,
        bool,
        "true or false",
        lambda v: isinstance(v, bool),
        "store every training message as received (input of the attacks)",
    ),
    "resume": Key(
        True,
        bool,
        "true or false",
        lambda v: isinstance(v, bool),
        "continue a run folder's checkpoint when started again with the same run-name",
    ),
    "run-name": Key(
        "",
        str,
        "a folder name: no '/' or '\\', not '.' or '..', no control characters "
        "(empty = <time>-<strategy>-seed<seed>)",
        _run_name_ok,
        "name of this run's output folder",
    ),
    "config": Key(
        "",
        str,
        "empty or a YAML file path relative to the project",
        lambda v: True,
        "YAML preset whose keys override the defaults",
    ),
}

DEFAULTS: Config = {name: key.default for name, key in SPEC.items()}


def _coerce(name: str, value: Any) -> Any:
    key = SPEC[name]
    if key.kind is bool:
        if isinstance(value, bool):
            return value
    elif key.kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif key.kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                return float(value)
    elif isinstance(value, str):
        return value
    raise ConfigError(f"config key '{name}' = {value!r} is invalid; allowed: {key.allowed}")


def validate(config: Mapping[str, Any]) -> Config:
    """Check every key; return a copy with values coerced to their types."""
    unknown = sorted(set(config) - set(SPEC))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; allowed keys: {sorted(SPEC)}")
    missing = sorted(set(SPEC) - set(config))
    if missing:
        raise ConfigError(f"missing config key(s) {missing}")
    out: Config = {}
    for name, value in config.items():
        value = _coerce(name, value)
        if not SPEC[name].check(value):
            raise ConfigError(
                f"config key '{name}' = {value!r} is invalid; allowed: {SPEC[name].allowed}"
            )
        out[name] = value
    if out["test-fraction"] + out["pretrain-fraction"] >= 0.9:
        raise ConfigError(
            "config keys 'test-fraction' + 'pretrain-fraction' must leave at least 10% "
            "of the data to the clients"
        )
    if out["hidden-feedback"] and out["strategy"] not in ("fedsn", "fedqsn"):
        raise ConfigError(
            "config key 'hidden-feedback' needs a server mask: strategy fedsn or fedqsn, "
            f"not {out['strategy']!r}"
        )
    if out["dataset"] in LANGUAGE_MODELLING and not is_hf(out["model"]):
        raise ConfigError(
            f"dataset {out['dataset']!r} is for causal language models: set model = "
            "'hf:<folder>' (a GPT-2-style checkpoint with its tokenizer)"
        )
    if out["dataset"] in LANGUAGE_MODELLING and out["max-length"] < 2:
        raise ConfigError(
            "config key 'max-length' must be at least 2 for a language model (a token "
            "predicts the next one)"
        )
    if out["partitioning"] == "genre" and out["dataset"] != "brown":
        raise ConfigError(
            f"partitioning 'genre' needs documents with genres (dataset 'brown'), not "
            f"{out['dataset']!r}"
        )
    if out["dataset"] in LANGUAGE_MODELLING and out["partitioning"] == "dirichlet":
        raise ConfigError(
            f"partitioning 'dirichlet' splits by class label and dataset "
            f"{out['dataset']!r} has none: use partitioning = 'iid'"
            + (" or 'genre'" if out["dataset"] == "brown" else "")
        )
    return out


def load_preset(path: str, project_dir: Path) -> Config:
    """Read a YAML preset (a mapping of config keys); ``path`` is relative to the project."""
    file = Path(path).expanduser()
    if not file.is_absolute():
        file = project_dir / file
    try:
        text = file.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read YAML preset '{path}' (looked at {file}): {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"YAML preset '{path}' is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"YAML preset '{path}' must be a mapping of config keys")
    if "config" in data:
        raise ConfigError(f"YAML preset '{path}' must not name another preset ('config')")
    unknown = sorted(set(data) - set(SPEC))
    if unknown:
        raise ConfigError(f"YAML preset '{path}' has unknown key(s) {unknown}")
    return data


def resolve(
    run_config: Mapping[str, Any],
    project_dir: Path,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults, preset, run-config and overrides (see module docstring) and validate."""
    overrides = dict(overrides or {})
    unknown = sorted((set(run_config) | set(overrides)) - set(SPEC))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; allowed keys: {sorted(SPEC)}")
    explicit = {k: v for k, v in run_config.items() if v != DEFAULTS[k]}
    preset_path = str(overrides.get("config", explicit.get("config", DEFAULTS["config"])))
    preset = load_preset(preset_path, project_dir) if preset_path else {}
    return validate({**DEFAULTS, **preset, **explicit, **overrides})


def output_root(config: Mapping[str, Any]) -> Path:
    """The absolute directory under which run folders are written."""
    root = Path(str(config["output-dir"])).expanduser()
    return root if root.is_absolute() else Path.home() / root


#: The generated table in docs/configuration.md sits between these lines.
TABLE_START = "<!-- config-table: generated by `python -m fedqsn_flwr.app.config`; do not edit -->"
TABLE_END = "<!-- end of config-table -->"


def markdown_table() -> str:
    """Every key of :data:`SPEC` as a Markdown table (default, allowed, meaning)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for name, key in SPEC.items():
        default = json.dumps(key.default)
        cells = [f"`{name}`", f"`{default}`", key.allowed, key.meaning]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def with_table(document: str) -> str:
    """``document`` with its generated table replaced by the current one."""
    if TABLE_START not in document or TABLE_END not in document:
        raise ConfigError(f"no generated table (between {TABLE_START!r} and {TABLE_END!r})")
    head, rest = document.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_START}\n{markdown_table()}\n{TABLE_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Rewrite the key table of docs/configuration.md (or the file given) from :data:`SPEC`."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "docs/configuration.md")
    path.write_text(with_table(path.read_text()))
    print(f"updated the config key table in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
