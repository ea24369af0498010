"""Measure what the mask policy costs (real simulations; takes minutes).

Compares masking hidden units only vs. also raw input features, and pretraining
with vs. without dropout.

    python benchmarks/mask_policy.py --seeds 0 1 2 --out /tmp/mask-policy

Prints a Markdown table of the final round's global / server / proxy accuracy
(mean ± std over seeds) for each variant.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from fedqsn_flwr.app.results import read_metrics
from fedqsn_flwr.experiments.simulation import simulate

VARIANTS: dict[str, dict[str, object]] = {
    "MLP, p=0.1, hidden units only (default policy)": {"model": "mlp"},
    "MLP, p=0.1, hidden units + input pixels": {"model": "mlp", "mask-input-layer": True},
    "MLP, p=0.3, hidden units only (default policy)": {
        "model": "mlp",
        "server-mask-ratio": 0.3,
        "client-mask-ratio": 0.3,
    },
    "MLP, p=0.3, hidden units + input pixels": {
        "model": "mlp",
        "server-mask-ratio": 0.3,
        "client-mask-ratio": 0.3,
        "mask-input-layer": True,
    },
    "CNN, p=0.3, dropout 0.2 (default)": {"server-mask-ratio": 0.3, "client-mask-ratio": 0.3},
    "CNN, p=0.3, no dropout": {"server-mask-ratio": 0.3, "client-mask-ratio": 0.3, "dropout": 0.0},
}
COLUMNS = ("global_accuracy", "server_accuracy", "proxy_accuracy")


def _fmt(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main() -> None:
    """Run every variant for every seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedqsn-mask-policy"))
    args = parser.parse_args()
    lines = ["| variant | global | server (p1 mask) | proxy |", "|---|---|---|---|"]
    for label, overrides in VARIANTS.items():
        finals: dict[str, list[float]] = {c: [] for c in COLUMNS}
        for seed in args.seeds:
            run = simulate(
                {**overrides, "seed": seed, "output-dir": str(args.out), "fraction-evaluate": 0.0},
                num_nodes=args.nodes,
            )
            last = read_metrics(run / "metrics.csv")[-1]
            for column in COLUMNS:
                finals[column].append(last[column])
        lines.append(f"| {label} | " + " | ".join(_fmt(finals[c]) for c in COLUMNS) + " |")
        print(lines[-1], flush=True)
    print(f"\nseeds {args.seeds}, {args.nodes} nodes, other keys at their defaults\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
