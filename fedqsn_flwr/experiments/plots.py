"""PNG plots of a comparison: accuracy and bytes per round, privacy-utility, sweeps.

For language models (summary rows whose ``metric`` is ``perplexity``) every
accuracy figure is a perplexity instead, lower is better, and the files are
named after it (``perplexity_per_round.png``, ``perplexity_vs_<knob>.png``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedqsn_flwr.app.base import LANGUAGE_MODELLING
from fedqsn_flwr.app.results import read_metrics

WHO = ("global", "server", "proxy")


def _scores(metric: str) -> list[tuple[str, str]]:
    return [(f"{who}_{metric}", who) for who in WHO]


def run_metric(run_dir: Path) -> str:
    """``perplexity`` for a run of a language-modelling data set, else ``accuracy``.

    Decided by the run's configured data set, never by its numbers (a diverged
    language model's perplexity is still its measure).
    """
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return "perplexity" if config.get("dataset") in LANGUAGE_MODELLING else "accuracy"


def comparison_metric(rows: Sequence[Mapping[str, Any]]) -> str:
    """``perplexity`` when every run is a language model's, else ``accuracy``."""
    if rows and all(r.get("metric") == "perplexity" for r in rows):
        return "perplexity"
    return "accuracy"


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _variant(row: Mapping[str, Any]) -> str:
    if not row["knob"]:
        return row["strategy"]
    if row["knob"] == "variant" or "=" in row["value"]:
        value = row["value"]
    else:
        value = f"{row['knob']}={row['value']}"
    return f"{row['strategy']} {value}"


def _per_round(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per variant and column: the mean over seeds of every round's value."""
    runs: dict[str, list[list[dict[str, float]]]] = {}
    for row in rows:
        runs.setdefault(_variant(row), []).append(
            read_metrics(Path(row["run_dir"]) / "metrics.csv")
        )
    out: dict[str, dict[str, list[float]]] = {}
    for variant, metrics in runs.items():
        length = min(len(m) for m in metrics)
        out[variant] = {
            column: [_nanmean([m[r][column] for m in metrics]) for r in range(length)]
            for column in metrics[0][0]
        }
    return out


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _accuracy_per_round(
    curves: Mapping[str, Mapping[str, list[float]]], path: Path, metric: str = "accuracy"
) -> None:
    plt = _pyplot()
    n = len(curves)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True
    )
    for ax, (variant, curve) in zip(axes.flat, curves.items(), strict=False):
        for column, label in _scores(metric):
            ax.plot(curve["round"], curve[column], marker=".", label=label)
        ax.set_title(variant, fontsize=8)
        ax.set_xlabel("round", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel(f"test {metric}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{metric.capitalize()} per round (mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _bytes_per_round(curves: Mapping[str, Mapping[str, list[float]]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for variant, curve in curves.items():
        for ax, column in zip(axes, ("bytes_down", "bytes_up"), strict=True):
            ax.plot(
                curve["round"][1:], [v / 1024 for v in curve[column][1:]], marker=".", label=variant
            )
    for ax, title in zip(axes, ("downlink", "uplink"), strict=True):
        ax.set_title(f"{title}: KiB per client per round", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _privacy_utility(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    x_column: str,
    x_label: str,
    metric: str = "accuracy",
) -> None:
    plt = _pyplot()
    y_column = f"global_{metric}"
    fig, ax = plt.subplots(figsize=(5, 4))
    by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(_variant(row), []).append(row)
    for variant, members in by_variant.items():
        xs = [float(m[x_column]) for m in members]
        ys = [float(m[y_column]) for m in members]
        points = ax.scatter(xs, ys, s=14, alpha=0.5)
        ax.scatter(
            [_nanmean(xs)],
            [_nanmean(ys)],
            s=60,
            marker="D",
            color=points.get_facecolor()[0],
            label=variant,
        )
    finite = [float(r[c]) for r in rows for c in (x_column, y_column)]
    finite = [v for v in finite if math.isfinite(v)]
    low = min(finite, default=0.0)
    high = 1.0 if metric == "accuracy" else max(finite, default=1.0)
    ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
    fedavg = _nanmean([float(r[y_column]) for r in rows if r["strategy"] == "fedavg"])
    if not math.isnan(fedavg):
        ax.axhline(fedavg, color="black", lw=0.8, ls=":", label="FedAvg's global model")
    data_only = _nanmean([float(r.get(f"data_only_{metric}", math.nan)) for r in rows])
    if x_column == f"best_attack_{metric}" and not math.isnan(data_only):
        ax.axvline(data_only, color="tab:red", lw=0.8, ls=":", label="data only (no proxy)")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"global model {metric} (server keeps)")
    better = "up and to the left" if metric == "accuracy" else "down and to the right"
    ax.set_title(f"Privacy-utility: {better} is better", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _sweep(
    rows: Sequence[Mapping[str, Any]], knob: str, path: Path, metric: str = "accuracy"
) -> None:
    plt = _pyplot()
    members = [r for r in rows if r["knob"] == knob]
    values = list(dict.fromkeys(r["value"] for r in members))
    numeric = all(_is_number(v) for v in values)
    positions = [float(v) for v in values] if numeric else list(range(len(values)))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    columns = _scores(metric)
    if all(not math.isnan(float(r[f"best_attack_{metric}"])) for r in members):
        columns.append((f"best_attack_{metric}", "best attack"))
    for strategy in dict.fromkeys(r["strategy"] for r in members):
        for column, label in columns:
            means, stds = [], []
            for value in values:
                got = [
                    float(r[column])
                    for r in members
                    if r["strategy"] == strategy and r["value"] == value
                ]
                got = [g for g in got if not math.isnan(g)]
                means.append(statistics.mean(got) if got else math.nan)
                stds.append(statistics.stdev(got) if len(got) > 1 else 0.0)
            ax.errorbar(
                positions, means, yerr=stds, marker="o", capsize=3, label=f"{strategy} {label}"
            )
    if not numeric:
        ax.set_xticks(positions, values, fontsize=7, rotation=15)
    ax.set_xlabel(knob)
    ax.set_ylabel(f"final test {metric}")
    ax.set_title(f"{metric.capitalize()} against {knob} (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_plots(rows: Sequence[Mapping[str, Any]], out: Path, attacked: bool) -> list[Path]:
    """Write every plot for ``rows`` (summary rows) into ``out``; return the paths.

    The privacy-utility plot uses the best attack's accuracy when the runs were
    ``attacked``, else the accuracy of the proxy a client receives.
    """
    if not rows:
        return []
    metric = comparison_metric(rows)
    curves = _per_round(rows)
    paths = [
        out / f"{metric}_per_round.png",
        out / "bytes_per_round.png",
        out / "privacy_utility.png",
    ]
    _accuracy_per_round(curves, paths[0], metric)
    _bytes_per_round(curves, paths[1])
    if attacked:
        x_column, x_label = f"best_attack_{metric}", f"best attack's {metric} (what clients obtain)"
    else:
        x_column, x_label = f"proxy_{metric}", f"{metric} of the proxy a client receives"
    _privacy_utility(rows, paths[2], x_column, x_label, metric)
    for knob in dict.fromkeys(r["knob"] for r in rows if r["knob"]):
        path = out / f"{metric}_vs_{knob}.png"
        _sweep(rows, knob, path, metric)
        paths.append(path)
    return paths
