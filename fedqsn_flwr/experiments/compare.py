r"""Compare strategies (and sweep FedQSN's knobs) on the same data, seeds and start model.

    fedqsn-compare --config configs/compare/strategies.yaml --out results/cmp
    fedqsn-compare --config configs/compare/ablation.yaml --out results/abl \\
        num-server-rounds=5 --seeds 0

A comparison preset is a YAML mapping:

* ``strategies`` -- strategy names (required); an entry may also be a mapping
  ``{strategy: fedqsn, label: p1=0.7+feedback, config: {...}}``: a variant of
  that strategy with its own run-config keys (on top of ``config``);
* ``seeds`` -- list of seeds (default ``[0, 1, 2]``); every strategy runs on each;
* ``nodes`` -- virtual SuperNodes per federation (default 10);
* ``config`` -- run-config keys shared by every run;
* ``sweep`` -- optional; ``{key: [values]}``, varied one key at a time with every
  other key as in ``config``. A value may be a mapping of several keys (e.g.
  ``{partitioning: dirichlet, dirichlet-alpha: 0.1}``);
* ``attack-epochs`` -- optional; epochs of every fine-tuning attack and of the
  data-only reference (default: :data:`fedqsn_flwr.experiments.attack.DEFAULT_EPOCHS`);
  ``attack-learning-rates``, ``attack-patience``, ``attack-max-clients`` and
  ``attack-save-models`` -- optional, as ``fedqsn-attack``'s options. The
  references (data-only, public corpus) are trained once per seed and kept in
  ``<out>/attack-cache/``.

Every run of a comparison uses one server secret per seed (``server-secret-file``
under ``<out>/secrets/``, written once), so strategies compare on the same
server split, initialisation and server mask, and a rerun reproduces them.

Extra ``key=value`` arguments override ``config`` for every run. Each run is a
real Flower simulation writing its own folder under ``<out>/runs/``; the summary
files are rewritten after every finished run, and a rerun with the same plan
reuses finished runs, so an interrupted comparison loses only the run in flight.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import secrets
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedqsn_flwr.app.config import STRATEGIES, ConfigError, resolve
from fedqsn_flwr.app.private import private_dir, write_private
from fedqsn_flwr.app.results import read_metrics
from fedqsn_flwr.experiments.plots import comparison_metric, run_metric

SUMMARY_COLUMNS = (
    "strategy",
    "knob",
    "value",
    "seed",
    "metric",
    "global_accuracy",
    "server_accuracy",
    "proxy_accuracy",
    "start_accuracy",
    "best_attack_accuracy",
    "data_only_accuracy",
    "knowledge_leakage",
    "privacy_gap",
    "finetune_attack_accuracy",
    "collusion_attack_accuracy",
    "public_fill_attack_accuracy",
    "exposure",
    "cosine_all",
    "rel_l2_all",
    "cosine_masked",
    "rel_l2_masked",
    "bytes_down_per_client",
    "bytes_up_per_client",
    "wall_seconds",
    "rounds",
    "global_perplexity",
    "server_perplexity",
    "proxy_perplexity",
    "start_perplexity",
    "best_attack_perplexity",
    "data_only_perplexity",
    "finetune_attack_perplexity",
    "collusion_attack_perplexity",
    "public_fill_attack_perplexity",
    "public_corpus_accuracy",
    "public_corpus_perplexity",
    "public_corpus_leakage",
    "best_attack",
    "run_dir",
)
#: The summary's numeric columns in accuracy terms; a language model's table
#: shows the ``_perplexity`` column in place of every ``_accuracy`` one.
NUMERIC_COLUMNS = SUMMARY_COLUMNS[5:24]
#: Summary columns filled from ``attacks.json`` (NaN when attacks were skipped).
ATTACK_COLUMNS = {
    "finetune_attack": ("finetune",),
    "collusion_attack": ("collusion_as_is", "collusion_finetune"),
    "public_fill_attack": ("public_fill_as_is", "public_fill_finetune"),
}
#: Prefixes of the score columns (``<prefix>_accuracy``, ``<prefix>_perplexity``).
SCORE_PREFIXES = (
    "global",
    "server",
    "proxy",
    "start",
    "best_attack",
    "data_only",
    "public_corpus",
    *ATTACK_COLUMNS,
)


def _in_terms_of(column: str, metric: str) -> str:
    """``column`` as the ``metric`` column (perplexity for a language model)."""
    if metric == "perplexity" and column.endswith("_accuracy"):
        return column.removesuffix("_accuracy") + "_perplexity"
    return column


#: Optional attack settings of a preset: key -> run_attacks argument.
ATTACK_KEYS = {
    "attack-epochs": "epochs",
    "attack-learning-rates": "learning_rates",
    "attack-patience": "patience",
    "attack-max-clients": "max_clients",
    "attack-save-models": "save_models",
}
PLAN_KEYS = {"strategies", "seeds", "nodes", "config", "sweep", *ATTACK_KEYS}
STRATEGY_ENTRY_KEYS = {"strategy", "label", "config"}


@dataclass(frozen=True)
class RunSpec:
    """One federation of a comparison."""

    strategy: str
    seed: int
    knob: str = ""
    value: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Folder name under ``<out>/runs/``."""
        variant = f"__{self.knob}={self.value}" if self.knob else ""
        safe = variant.replace("/", "_").replace(" ", "").replace(",", "+")
        return f"{self.strategy}{safe}__seed{self.seed}"


@dataclass(frozen=True)
class Plan:
    """Everything a comparison runs."""

    runs: list[RunSpec]
    nodes: int
    attack_epochs: int | None = None
    #: The other attack settings (``run_attacks`` keyword arguments).
    attack_options: dict[str, Any] = field(default_factory=dict)


def _label(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def load_plan(
    path: Path,
    overrides: Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    strategies: Sequence[str] | None = None,
) -> Plan:
    """Read a comparison preset and expand it into runs (every config is validated)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read comparison preset '{path}': {err}") from err
    if not isinstance(data, dict) or "strategies" not in data:
        raise ConfigError(f"comparison preset '{path}' must be a mapping with 'strategies'")
    if unknown := sorted(set(data) - PLAN_KEYS):
        raise ConfigError(f"comparison preset '{path}' has unknown key(s) {unknown}")
    entries = [_strategy_entry(e, path) for e in data["strategies"]]
    if strategies:
        entries = [e for e in entries if e[0] in strategies] + [
            (s, "", {}) for s in strategies if s not in {e[0] for e in entries}
        ]
    if bad := [s for s, _, _ in entries if s not in STRATEGIES]:
        raise ConfigError(f"unknown strategy {bad}; allowed: {list(STRATEGIES)}")
    base = {**(data.get("config") or {}), **(overrides or {})}
    variants: list[tuple[str, str, dict[str, Any]]] = []
    for knob, values in (data.get("sweep") or {}).items():
        for value in values:
            extra = dict(value) if isinstance(value, Mapping) else {knob: value}
            variants.append((knob, _label(value), extra))
    variants = variants or [("", "", {})]
    runs = []
    for strategy, entry_label, entry_config in entries:
        for knob, label, extra in variants:
            if entry_label:
                knob, label = "variant", entry_label if not label else f"{entry_label},{label}"
            for seed in seeds or data.get("seeds", [0, 1, 2]):
                config = {**base, **entry_config, **extra, "strategy": strategy, "seed": int(seed)}
                resolve({}, Path.cwd(), config)  # fail before the first run, not the tenth
                runs.append(RunSpec(strategy, int(seed), knob, label, config))
    nodes = data.get("nodes", 10)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError(f"comparison preset '{path}': 'nodes' must be an integer >= 1")
    attack_epochs = data.get("attack-epochs")
    if attack_epochs is not None and (not isinstance(attack_epochs, int) or attack_epochs < 1):
        raise ConfigError(f"comparison preset '{path}': 'attack-epochs' must be an integer >= 1")
    return Plan(
        runs=runs,
        nodes=nodes,
        attack_epochs=attack_epochs,
        attack_options=_attack_options(data, path),
    )


def _attack_options(data: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The preset's attack-* settings other than the epochs, checked."""
    options: dict[str, Any] = {}
    for key in ("attack-patience", "attack-max-clients"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"comparison preset '{path}': '{key}' must be an integer >= 1")
        options[ATTACK_KEYS[key]] = value
    rates = data.get("attack-learning-rates")
    if rates is not None:
        if (
            not isinstance(rates, list)
            or not rates
            or not all(
                isinstance(r, int | float) and not isinstance(r, bool) and r > 0 for r in rates
            )
        ):
            raise ConfigError(
                f"comparison preset '{path}': 'attack-learning-rates' must be a list of "
                "positive numbers"
            )
        options["learning_rates"] = [float(r) for r in rates]
    save = data.get("attack-save-models")
    if save is not None:
        if not isinstance(save, bool):
            raise ConfigError(
                f"comparison preset '{path}': 'attack-save-models' must be true or false"
            )
        options["save_models"] = save
    return options


def _strategy_entry(entry: Any, path: Path) -> tuple[str, str, dict[str, Any]]:
    """(strategy, label, config) of one ``strategies`` entry."""
    if isinstance(entry, str):
        return entry, "", {}
    if not isinstance(entry, Mapping) or "strategy" not in entry:
        raise ConfigError(
            f"comparison preset '{path}': a strategies entry is a name or a mapping with "
            f"'strategy' (and 'label', 'config'); got {entry!r}"
        )
    if unknown := sorted(set(entry) - STRATEGY_ENTRY_KEYS):
        raise ConfigError(f"comparison preset '{path}': strategies entry has unknown {unknown}")
    config = dict(entry.get("config") or {})
    label = str(entry.get("label") or _label(config))
    return str(entry["strategy"]), label, config


def _finished(run_dir: Path) -> bool:
    return (run_dir / "final_model.pt").exists() and (run_dir / "compare.json").exists()


def _row(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """One summary row, read from the run's own files."""
    rows = read_metrics(run_dir / "metrics.csv")
    last, trained = rows[-1], rows[1:]
    wall = json.loads((run_dir / "compare.json").read_text())["wall_seconds"]

    def mean(column: str) -> float:
        values = [r[column] for r in trained if not math.isnan(r[column])]
        return sum(values) / len(values) if values else math.nan

    metric = run_metric(run_dir)
    row: dict[str, Any] = {
        "strategy": spec.strategy,
        "knob": spec.knob,
        "value": spec.value,
        "seed": spec.seed,
        "metric": metric,
        **{f"{p}_{m}": math.nan for p in SCORE_PREFIXES for m in ("accuracy", "perplexity")},
        "global_accuracy": last["global_accuracy"],
        "server_accuracy": last["server_accuracy"],
        "proxy_accuracy": last["proxy_accuracy"],
        "start_accuracy": rows[0]["global_accuracy"],
        "global_perplexity": last.get("global_perplexity", math.nan),
        "server_perplexity": last.get("server_perplexity", math.nan),
        "proxy_perplexity": last.get("proxy_perplexity", math.nan),
        "start_perplexity": rows[0].get("global_perplexity", math.nan),
        "exposure": last["exposure"],
        "cosine_all": mean("cosine_all"),
        "rel_l2_all": mean("rel_l2_all"),
        "cosine_masked": mean("cosine_masked"),
        "rel_l2_masked": mean("rel_l2_masked"),
        "bytes_down_per_client": mean("bytes_down"),
        "bytes_up_per_client": mean("bytes_up"),
        "wall_seconds": wall,
        "rounds": int(last["round"]),
        "run_dir": str(run_dir),
        "best_attack": "",
        "knowledge_leakage": math.nan,
        "privacy_gap": math.nan,
        "public_corpus_leakage": math.nan,
    }
    attacks_file = run_dir / "attacks.json"
    if attacks_file.exists():
        report = json.loads(attacks_file.read_text())
        metric = report.get("metric", "accuracy")
        value = {a["attack"]: a[metric] for a in report["attacks"]}
        best = max if metric == "accuracy" else min  # perplexity: lower is better
        row["best_attack"] = report["best_attack"]
        row[f"best_attack_{metric}"] = report[f"best_attack_{metric}"]
        row["privacy_gap"] = report["privacy_gap"]
        row[f"data_only_{metric}"] = report.get(f"data_only_{metric}", math.nan)
        leakage = report.get("knowledge_leakage")
        row["knowledge_leakage"] = math.nan if leakage is None else leakage
        if "public_corpus" in report:
            row[f"public_corpus_{metric}"] = report[f"public_corpus_{metric}"]
            leakage = report["public_corpus_leakage"]
            row["public_corpus_leakage"] = math.nan if leakage is None else leakage
        for prefix, names in ATTACK_COLUMNS.items():
            row[f"{prefix}_{metric}"] = best(value[n] for n in names)
    return row


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_summary(rows: Sequence[Mapping[str, Any]], out: Path) -> None:
    """Write ``summary.csv`` (one row per run) and ``summary.md`` (mean ± std over seeds)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    writer.writerows([_cell(row[c]) for c in SUMMARY_COLUMNS] for row in rows)
    _write_atomic(out / "summary.csv", buffer.getvalue())
    _write_atomic(out / "summary.md", summary_markdown(rows))
    _write_atomic(out / "headline.md", headline_markdown(rows))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.10g}"
    return str(value)


def _number(value: Any) -> float:
    """A summary cell as a float: NaN for a missing one (None, "" of a CSV, or no key)."""
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    big = max(abs(v) for v in values) >= 1000
    return (
        f"{statistics.mean(values):,.0f} ± {std:,.0f}"
        if big
        else (f"{statistics.mean(values):.3f} ± {std:.3f}")
    )


def groups(
    rows: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str, str], list[Mapping[str, Any]]]:
    """Rows grouped by (strategy, knob, value), in first-seen order."""
    grouped: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["strategy"], row["knob"], row["value"]), []).append(row)
    return grouped


def _variant_label(knob: str, value: str) -> str:
    if knob == "variant" or "=" in value:
        return value
    return f"{knob}={value}" if knob else "–"


def summary_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Mean ± std over seeds for every (strategy, knob, value).

    A comparison of language models shows perplexities (lower is better).
    """
    metric = comparison_metric(rows)
    columns = [_in_terms_of(c, metric) for c in NUMERIC_COLUMNS]
    header = ["strategy", "variant", "seeds", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (strategy, knob, value), members in groups(rows).items():
        variant = _variant_label(knob, value)
        cells = [strategy, variant, str(len(members))]
        cells += [_mean_std([_number(m.get(c)) for m in members]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: The headline table's columns: (summary column, header).
HEADLINE_COLUMNS = (
    ("start_accuracy", "start"),
    ("global_accuracy", "global"),
    ("proxy_accuracy", "proxy"),
    ("best_attack_accuracy", "best attack"),
    ("data_only_accuracy", "data only"),
    ("knowledge_leakage", "leakage"),
    ("bytes_down_per_client", "bytes down"),
    ("bytes_up_per_client", "bytes up"),
)


#: Headline columns shown when a reference pretrained on the public server text exists.
PUBLIC_CORPUS_COLUMNS = (
    ("public_corpus_accuracy", "public corpus"),
    ("public_corpus_leakage", "leakage vs public corpus"),
)


def headline_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Start, global, proxy, best attack, data only, leakage and bytes (mean ± std).

    A variant whose runs all had no model knowledge to protect (global at most
    2 points above data only) shows that instead of a leakage figure. For
    language models the scores are perplexities (the headers say so).
    """
    metric = comparison_metric(rows)
    suffix = " (perplexity)" if metric == "perplexity" else ""
    shown = list(HEADLINE_COLUMNS)
    if any(not math.isnan(_number(r.get(f"public_corpus_{metric}"))) for r in rows):
        # the server's pretraining text is public: what pretraining on it gives
        at = shown.index(("knowledge_leakage", "leakage")) + 1
        shown[at:at] = PUBLIC_CORPUS_COLUMNS
    header = ["strategy", "variant", "seeds"]
    header += [h + (suffix if c.endswith("_accuracy") else "") for c, h in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (strategy, knob, value), members in groups(rows).items():
        variant = _variant_label(knob, value)
        cells = [strategy, variant, str(len(members))]
        attacked = [m.get("best_attack", "") != "" for m in members]
        # a public-corpus reference exists only where the server's text is public
        with_corpus = [
            a and not math.isnan(_number(m.get(f"public_corpus_{metric}")))
            for a, m in zip(attacked, members, strict=True)
        ]
        for column, _ in shown:
            values = [_number(m.get(_in_terms_of(column, metric))) for m in members]
            if column == "knowledge_leakage":
                cells.append(_leakage_cell(attacked, values))
            elif column == "public_corpus_leakage":
                cells.append(_leakage_cell(with_corpus, values))
            else:
                cells.append(_mean_std(values))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _leakage_cell(measured: Sequence[bool], values: Sequence[float]) -> str:
    """Leakage mean ± std, saying for how many seeds there was no knowledge to protect.

    ``measured``: per run, whether it has the figure at all (attacked, and for
    the public-corpus leakage, with that reference); "–" when none has it. A
    measured run without a value had no model knowledge to protect.
    """
    values = [v for v, m in zip(values, measured, strict=True) if m]
    if not values:
        return "–"
    missing = sum(1 for v in values if math.isnan(v))
    if missing == len(values):
        return "no model knowledge to protect"
    cell = _mean_std(values)
    if missing:
        cell += f" ({len(values) - missing} of {len(values)} seeds; the others: no knowledge)"
    return cell


def run_plan(plan: Plan, out: Path, attacks: bool = True) -> list[dict[str, Any]]:
    """Run (or reuse) every run of ``plan``; keep the summary current after each.

    With ``attacks``, every finished run is also attacked (:mod:`fedqsn_flwr.experiments.attack`).
    """
    from fedqsn_flwr.experiments.attack import run_attacks
    from fedqsn_flwr.experiments.simulation import simulate

    # absolute: a relative output-dir would be taken under the home folder
    out = out.expanduser().resolve()
    private_dir(out, restrict_existing=False)  # the secrets and runs inside are private
    runs_dir = private_dir(out / "runs")
    secret_files = _seed_secrets(out, {spec.seed for spec in plan.runs})
    rows: list[dict[str, Any]] = []
    total = len(plan.runs)
    for index, spec in enumerate(plan.runs, start=1):
        run_dir = runs_dir / spec.name
        tag = f"[{index}/{total}] {spec.name}"
        config = {**spec.overrides, "output-dir": str(runs_dir), "run-name": spec.name}
        config.setdefault("server-secret-file", str(secret_files[spec.seed]))
        if _finished(run_dir) and _same_config(run_dir, config):
            print(f"{tag}: finished earlier, reused", flush=True)
        else:
            print(f"{tag}: running", flush=True)
            start = time.monotonic()
            simulate(config, num_nodes=plan.nodes)
            wall = time.monotonic() - start
            write_private(run_dir / "compare.json", json.dumps({"wall_seconds": round(wall, 2)}))
        if attacks and not (run_dir / "attacks.json").exists():
            options = dict(plan.attack_options)
            if plan.attack_epochs is not None:
                options["epochs"] = plan.attack_epochs
            run_attacks(run_dir, cache_dir=out / "attack-cache", **options)
        row = _row(spec, run_dir)
        rows.append(row)
        write_summary(rows, out)
        m = row["metric"]
        label = "" if m == "accuracy" else f"({m}) "
        print(
            f"{tag}: {label}global {row[f'global_{m}']:.4f} | server {row[f'server_{m}']:.4f}"
            f" | proxy {row[f'proxy_{m}']:.4f} | best attack {row[f'best_attack_{m}']:.4f}"
            f" | {row['wall_seconds']:.0f} s",
            flush=True,
        )
    return rows


def _seed_secrets(out: Path, seeds: set[int]) -> dict[int, Path]:
    """One server-secret file per seed under ``<out>/secrets/`` (written once, 0600)."""
    folder = private_dir(out / "secrets")
    files = {}
    for seed in sorted(seeds):
        file = folder / f"seed{seed}.secret"
        if not file.exists():
            write_private(file, secrets.token_hex(32))
        files[seed] = file.resolve()
    return files


def _same_config(run_dir: Path, config: Mapping[str, Any]) -> bool:
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    return saved == resolve({}, Path.cwd(), config)


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got '{item}'")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fedqsn_flwr.experiments.compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", required=True, type=Path, help="comparison preset (YAML)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--strategies", nargs="+", help="override the preset's strategies")
    parser.add_argument(
        "--skip-attacks",
        action="store_true",
        help="do not attack the runs (no privacy-gap columns)",
    )
    parser.add_argument("overrides", nargs="*", help="run-config key=value for every run")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.config, _parse_overrides(args.overrides), args.seeds, args.strategies)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(plan.runs)} runs, {plan.nodes} nodes each; writing to {args.out}", flush=True)
    try:
        rows = run_plan(plan, args.out, attacks=not args.skip_attacks)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished runs are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    from fedqsn_flwr.experiments.plots import write_plots

    attacked = all(r["best_attack"] != "" for r in rows)
    for path in write_plots(rows, args.out, attacked):
        print(f"wrote {path}")
    print((args.out / "summary.md").read_text())
    print(f"summary: {args.out / 'summary.csv'}, {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
