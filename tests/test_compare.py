"""The comparison command: plan expansion, real runs of every strategy, summary files."""

import csv
import math

import pytest
import yaml

from fedqsn_flwr.app.config import ConfigError
from fedqsn_flwr.app.results import read_metrics
from fedqsn_flwr.experiments.compare import (
    SUMMARY_COLUMNS,
    headline_markdown,
    load_plan,
    main,
    summary_markdown,
)


def _preset(tmp_path, **content):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def test_sweep_expands_one_knob_at_a_time(tmp_path):
    path = _preset(
        tmp_path,
        strategies=["fedqsn"],
        seeds=[0, 1],
        config={"num-server-rounds": 3},
        sweep={
            "bit-width": [2, 8],
            "partitioning": [
                {"partitioning": "iid"},
                {"partitioning": "dirichlet", "dirichlet-alpha": 0.1},
            ],
        },
    )
    plan = load_plan(path, {"local-epochs": 2})
    assert len(plan.runs) == 8
    labels = {(r.knob, r.value) for r in plan.runs}
    assert labels == {
        ("bit-width", "2"),
        ("bit-width", "8"),
        ("partitioning", "partitioning=iid"),
        ("partitioning", "partitioning=dirichlet,dirichlet-alpha=0.1"),
    }
    run = next(r for r in plan.runs if r.value.endswith("alpha=0.1"))
    assert run.overrides["dirichlet-alpha"] == 0.1 and run.overrides["local-epochs"] == 2
    assert run.overrides["num-server-rounds"] == 3 and "bit-width" not in run.overrides
    assert len({r.name for r in plan.runs}) == 8


@pytest.mark.parametrize(
    "content, match",
    [
        ({"strategies": ["fedfoo"]}, "unknown strategy"),
        ({"strategies": ["fedqsn"], "sweep": {"bit-width": [4, 9]}}, "bit-width"),
        ({"strategies": ["fedqsn"], "runs": 3}, "unknown key"),
        ({"seeds": [0]}, "strategies"),
        ({"strategies": ["fedqsn"], "nodes": 0}, "nodes"),
        ({"strategies": ["fedqsn"], "attack-epochs": 0}, "attack-epochs"),
        ({"strategies": [{"label": "x"}]}, "strategies entry"),
        ({"strategies": [{"strategy": "fedqsn", "colour": 1}]}, "unknown"),
        (
            {"strategies": [{"strategy": "fedq", "config": {"hidden-feedback": True}}]},
            "hidden-feedback",
        ),
    ],
)
def test_bad_plans_fail_before_any_run(tmp_path, content, match):
    with pytest.raises(ConfigError, match=match):
        load_plan(_preset(tmp_path, **content))


def test_shipped_comparison_presets_expand(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "compare"
    for preset in root.glob("*.yaml"):  # every shipped preset loads
        assert load_plan(preset).runs, preset
    assert len(load_plan(root / "strategies.yaml").runs) == 12
    assert len(load_plan(root / "ablation.yaml").runs) == 18 * 3
    assert len(load_plan(root / "scarce-data.yaml").runs) == 6
    bits = load_plan(root / "update-bits.yaml")
    assert [r.overrides["update-bit-width"] for r in bits.runs[::3]] == [32, 16, 8, 4]
    flagship = load_plan(root / "proprietary.yaml")
    assert len(flagship.runs) == 9 * 3 and flagship.attack_epochs == 30
    variants = {(r.strategy, r.value) for r in flagship.runs}
    assert ("fedqsn", "p1=0.7+feedback") in variants and ("fedavg", "") in variants
    run = next(r for r in flagship.runs if r.value == "p1=0.8+feedback")
    assert run.overrides["server-mask-ratio"] == 0.8 and run.overrides["hidden-feedback"]
    assert run.overrides["dataset"] == "mnist1d" and run.overrides["mnist1d-client-shear"] == 1.25
    brown = load_plan(root / "brown-gpt2.yaml")
    assert len(brown.runs) == 7 * 3 and brown.attack_epochs == 12
    assert brown.attack_options == {
        "patience": 2,
        "max_clients": 1,
        "learning_rates": [3e-4, 1e-3, 3e-3],
        "save_models": True,
    }
    with pytest.raises(ConfigError, match="attack-patience"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("strategies: [fedavg]\nattack-patience: 0\n")
        load_plan(bad)
    no_shift = load_plan(root / "proprietary-no-shift.yaml")
    assert {r.overrides["mnist1d-client-shear"] for r in no_shift.runs} == {0.75}


@pytest.mark.slow
def test_compare_runs_every_strategy_resumes_after_an_interrupt_and_summarises(
    tmp_path, monkeypatch, capsys
):
    """One comparison of the five strategies, interrupted at its third run and resumed.

    The federations run in-process (the app's server and client code over an
    in-process grid, :func:`run_in_process`): what is tested here is the
    comparison tool; Flower's engine is tested in test_simulation.py.
    """
    import fedqsn_flwr.experiments.simulation as simulation
    from fedqsn_flwr.experiments.inprocess import run_in_process

    real = run_in_process
    calls = []

    def interrupted_third(config, num_nodes):
        calls.append(config["strategy"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(config, num_nodes=num_nodes)

    preset = _preset(
        tmp_path,
        strategies=["fedavg", "fedprox", "fedq", "fedsn", "fedqsn"],
        seeds=[3],
        nodes=2,
        **{"attack-epochs": 2},
        config={
            "num-server-rounds": 1,
            "pretrain-epochs": 5,
            "local-epochs": 1,
            "fraction-evaluate": 0.0,
        },
    )
    out = tmp_path / "out"
    monkeypatch.setattr(simulation, "simulate", interrupted_third)
    assert main(["--config", str(preset), "--out", str(out)]) == 130
    with (out / "summary.csv").open() as handle:
        assert [r["strategy"] for r in csv.DictReader(handle)] == ["fedavg", "fedprox"]
    first = (out / "runs" / "fedavg__seed3" / "metrics.csv").read_text()
    capsys.readouterr()

    monkeypatch.setattr(simulation, "simulate", real)
    assert main(["--config", str(preset), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/5] fedavg__seed3: finished earlier, reused" in printed
    assert "[5/5] fedqsn__seed3: global" in printed
    assert (out / "runs" / "fedavg__seed3" / "metrics.csv").read_text() == first

    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert [r["strategy"] for r in rows] == ["fedavg", "fedprox", "fedq", "fedsn", "fedqsn"]
    for row in rows:
        metrics = read_metrics(out / "runs" / f"{row['strategy']}__seed3" / "metrics.csv")
        assert [int(m["round"]) for m in metrics] == [0, 1]  # 1 round, end to end
        assert float(row["global_accuracy"]) == pytest.approx(metrics[-1]["global_accuracy"])
        assert float(row["proxy_accuracy"]) == pytest.approx(metrics[-1]["proxy_accuracy"])
        assert float(row["bytes_down_per_client"]) == pytest.approx(metrics[1]["bytes_down"])
        assert float(row["wall_seconds"]) > 0
    starts = {row["start_accuracy"] for row in rows}
    assert len(starts) == 1  # same seed -> same pretrained start model for every strategy
    by = {r["strategy"]: float(r["bytes_down_per_client"]) for r in rows}
    assert by["fedqsn"] < by["fedq"] < by["fedsn"] < by["fedavg"]
    assert by["fedqsn"] < 0.2 * by["fedavg"]  # 4-bit codes of ~81% of the weights vs float32
    assert float(rows[0]["global_accuracy"]) > 0.5  # the FedAvg baseline runs and learns
    assert not math.isnan(float(rows[-1]["server_accuracy"]))

    markdown = (out / "summary.md").read_text()
    assert markdown.count("\n| fed") == 5 and "±" in markdown
    for name in ("accuracy_per_round", "bytes_per_round", "privacy_utility"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun reuses the finished runs and reproduces the same summary
    before = (out / "summary.csv").read_text()
    assert main(["--config", str(preset), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished earlier, reused") == 5
    assert (out / "summary.csv").read_text() == before


def _summary_row(strategy, seed, **values):
    """A language model's summary row, every number NaN unless given."""
    row = {c: math.nan for c in SUMMARY_COLUMNS}
    row |= {"strategy": strategy, "knob": "", "value": "", "seed": seed, "metric": "perplexity"}
    row |= {"best_attack": "finetune", "run_dir": f"runs/{strategy}__seed{seed}"}
    row |= {"global_perplexity": 30.0, "best_attack_perplexity": 40.0}
    row |= {"data_only_perplexity": 60.0, "knowledge_leakage": 0.4}
    return row | values


def _table(markdown):
    header, _, *lines = markdown.strip().splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    return {
        cells[0]: dict(zip(names, cells, strict=True))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)
    }


def test_headline_shows_a_dash_where_runs_have_no_public_corpus_reference():
    corpus = {"public_corpus_perplexity": 50.0, "public_corpus_leakage": 0.25}
    rows = [
        _summary_row("fedqsn", 0, **corpus),
        _summary_row("fedqsn", 1, **(corpus | {"public_corpus_leakage": 0.35})),
        _summary_row("fedavg", 0),  # NaN: a run without the reference
        _summary_row("fedq", 0, public_corpus_perplexity="", public_corpus_leakage=""),  # CSV
        {
            k: v
            for k, v in _summary_row("fedsn", 0).items()
            if not k.startswith("public_corpus")  # a row written before the columns existed
        },
    ]
    markdown = headline_markdown(rows)
    assert "nan" not in markdown.lower()
    table = _table(markdown)
    corpus_cell, leakage_cell = "public corpus (perplexity)", "leakage vs public corpus"
    assert table["fedqsn"][corpus_cell] == "50.000 ± 0.000"
    assert table["fedqsn"][leakage_cell] == "0.300 ± 0.071"
    for strategy in ("fedavg", "fedq", "fedsn"):
        assert table[strategy][corpus_cell] == "–", strategy
        assert table[strategy][leakage_cell] == "–", strategy
        assert table[strategy]["leakage"] == "0.400 ± 0.000", strategy
    # measured but no knowledge to protect: said so, as for the data-only leakage
    rows[0]["public_corpus_leakage"] = rows[1]["public_corpus_leakage"] = math.nan
    table = _table(headline_markdown(rows))
    assert table["fedqsn"][leakage_cell] == "no model knowledge to protect"
    # no run with the reference: no such columns
    assert corpus_cell not in headline_markdown(rows[2:])
    assert "nan" not in summary_markdown(rows).lower()
