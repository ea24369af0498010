"""Hugging Face models from a local checkpoint: mask policy, proxy round trip, federations.

Offline: the checkpoints are tiny models built from a config in the test and
saved with ``save_pretrained``; the tokenizer is trained on the test's rows.
"""

import math
import re
import shutil
import sys
from dataclasses import replace

import pytest
import torch
from flwr.app import RecordDict

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from fedqsn_flwr import tied_state_once  # noqa: E402
from fedqsn_flwr.app.base import IGNORE_INDEX, InputSpec, Split
from fedqsn_flwr.app.config import DEFAULTS, ConfigError, validate  # noqa: E402
from fedqsn_flwr.app.huggingface import HuggingFaceError, load_tokenizer
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.results import load_saved_messages, read_metrics  # noqa: E402
from fedqsn_flwr.app.sources import DataError, DataKey, load_raw  # noqa: E402
from fedqsn_flwr.app.training import evaluate, train  # noqa: E402
from fedqsn_flwr.core.masking import (  # noqa: E402
    draw_client_mask,
    draw_server_mask,
    format_description,
    policy_for_model,
)
from fedqsn_flwr.core.secret import SECRET_FILE  # noqa: E402
from fedqsn_flwr.experiments.attack import format_report, run_attacks  # noqa: E402
from fedqsn_flwr.experiments.compare import (  # noqa: E402
    RunSpec,
    headline_markdown,
    summary_markdown,
)
from fedqsn_flwr.experiments.compare import _row as compare_row  # noqa: E402
from fedqsn_flwr.experiments.inprocess import run_in_process  # noqa: E402
from fedqsn_flwr.experiments.plots import write_plots  # noqa: E402
from fedqsn_flwr.flower.client_helpers import freeze_hidden, load_received  # noqa: E402
from fedqsn_flwr.flower.proxy import (  # noqa: E402
    decode_update,
    encode_proxy,
    encode_update,
    message_units,
)
from tests.hf_helpers import (  # noqa: E402
    e2e_rows,
    row_texts,
    save_tiny_checkpoint,
    sst2_rows,
    write_jsonl,
)

FAMILIES = {
    # family: (data set, rows, row seed of the validation file)
    "roberta": ("glue/sst2", sst2_rows),
    "gpt2": ("e2e_nlg", e2e_rows),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family: (checkpoint folder, data folder with train and validation rows)."""
    found = {}
    for family, (_, make_rows) in FAMILIES.items():
        base = tmp_path_factory.mktemp(family)
        train_rows, validation_rows = make_rows(600, seed=0), make_rows(90, seed=1)
        write_jsonl(base / "data" / "train.jsonl", train_rows)
        write_jsonl(base / "data" / "validation.jsonl", validation_rows)
        folder = save_tiny_checkpoint(
            base / "checkpoint", family, row_texts(train_rows + validation_rows)
        )
        found[family] = (folder, base / "data")
    return found


def _model_and_data(checkpoints, family):
    folder, data = checkpoints[family]
    key = DataKey(FAMILIES[family][0], data_dir=str(data), max_length=32, tokenizer=str(folder))
    raw = load_raw(key)
    model = build_model(f"hf:{folder}", seed=0, spec=raw.spec)
    return model, raw


def _two_dimensional(state):
    return {name for name, tensor in state.items() if tensor.dim() == 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_policy_masks_every_projection_and_embedding(checkpoints, family):
    model, _ = _model_and_data(checkpoints, family)
    state = model.state_dict()
    policy = policy_for_model(model)
    # every 2-D tensor of these families is an embedding or a projection: all masked
    assert _two_dimensional(state) == set(policy.unit_axes)
    modules = dict(model.named_modules())
    for name, axis in policy.unit_axes.items():
        module = modules[name.removesuffix(".weight")]
        kind = type(module).__name__
        # the unit axis is the input features (Conv1D stores input x output)
        expected = {"Conv1D": 0, "Linear": 1, "Embedding": 1}[kind]
        assert axis == expected, (name, kind)
        assert policy.unit_counts[name] == state[name].shape[axis]
    # LayerNorms and biases stay whole
    assert all(t.dim() == 1 for n, t in state.items() if n not in policy.unit_axes)
    described = policy.describe(state)
    assert described["masked_share"] > 0.9
    text = format_description(described)
    if family == "gpt2":
        # the output head is the token embedding: one tensor, masked and sent once
        assert "model.lm_head.weight" not in state
        assert policy.tied == {"model.lm_head.weight": "model.transformer.wte.weight"}
        assert "masked (axis 0): model.transformer.h.*.attn.c_attn.weight" in text
        assert "tied: model.lm_head.weight = model.transformer.wte.weight" in text
    else:
        assert "masked (axis 1): model.roberta.encoder.layer.*.attention.self.query.weight" in text
        assert "whole: model.roberta.embeddings.LayerNorm.weight" in text


def test_bert_and_a_bare_gpt2_under_the_library_policy():
    """Models built in code (a user's own app): BERT's projections, GPT-2's tie refused."""
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=20,
        )
    )
    policy = policy_for_model(bert)
    assert _two_dimensional(bert.state_dict()) == set(policy.unit_axes)
    assert set(policy.unit_axes.values()) == {1}

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    # one tensor under two names would get two masks: the union of both is shown
    with pytest.raises(ValueError, match="tied_state_once"):
        policy_for_model(gpt2)
    tied_state_once(gpt2)
    state = gpt2.state_dict()
    assert "lm_head.weight" not in state
    assert _two_dimensional(state) == set(policy_for_model(gpt2).unit_axes)
    # loading the state without the alias is accepted, and the tie still holds
    gpt2.load_state_dict({k: torch.zeros_like(v) for k, v in state.items()})
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert float(gpt2.lm_head.weight.detach().abs().sum()) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_round_trip_hides_units_and_maps_the_update_back(checkpoints, family):
    model, raw = _model_and_data(checkpoints, family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    policy = policy_for_model(model)
    server_mask = draw_server_mask(policy, 0.2, 1)
    visible = draw_client_mask(server_mask, 0.2, 2)
    arrays, layout, spec = encode_proxy(
        state, policy, visible, bit_width=4, block_size=64, update_bit_width=32
    )
    # hidden units are absent from the message: it lists exactly the visible ones,
    # and its values hold one entry per visible slice element of every tensor
    shown = message_units(arrays, layout)
    assert {n: u.tolist() for n, u in shown.items()} == {n: u.tolist() for n, u in visible.items()}
    assert "model.lm_head.weight" not in list(layout["tensors"])

    client = build_model(f"hf:{checkpoints[family][0]}", seed=5, spec=raw.spec)
    received = load_received(client, RecordDict({"proxy": arrays, "proxy-layout": layout}))
    client_state = client.state_dict()
    for name, axis in policy.unit_axes.items():
        hidden = sorted(set(range(policy.unit_counts[name])) - set(visible[name].tolist()))
        assert float(client_state[name].index_select(axis, torch.tensor(hidden)).abs().sum()) == 0
    if family == "gpt2":
        assert client.model.lm_head.weight is client.model.transformer.wte.weight

    # a few steps of training on the proxy, hidden units frozen
    data = Split(raw.train_x[:64], raw.train_y[:64])
    with freeze_hidden(client, received):
        train(client, data, epochs=1, learning_rate=1e-3, batch_size=16, seed=0, optimizer="adamw")
    for name, axis in policy.unit_axes.items():
        hidden = sorted(set(range(policy.unit_counts[name])) - set(visible[name].tolist()))
        assert (
            float(client.state_dict()[name].index_select(axis, torch.tensor(hidden)).abs().sum())
            == 0
        )
    deltas = decode_update(encode_update(client.state_dict(), received), spec, policy)
    # the update is of the visible units only, and it moved them
    for name, axis in policy.unit_axes.items():
        assert deltas[name].shape[axis] == len(visible[name])
    assert any(float(d.abs().sum()) > 0 for d in deltas.values())


def test_language_model_targets_score_the_reference_only(checkpoints):
    _, raw = _model_and_data(checkpoints, "gpt2")
    assert raw.spec.task == "causal-lm" and raw.train_y.shape == raw.train_x.shape
    for x, y in zip(raw.train_x[:20], raw.train_y[:20], strict=True):
        scored = (y != IGNORE_INDEX).nonzero().flatten()
        # a contiguous run of reference tokens, after the meaning representation
        assert scored.numel() > 3 and scored[0] > 3
        assert scored.tolist() == list(range(int(scored[0]), int(scored[-1]) + 1))
        assert torch.equal(x[scored], y[scored])


@pytest.mark.slow  # a whole federation (in-process: the app's server and client code)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_federation_lowers_the_loss_from_scratch_and_never_moves_hidden_units(
    checkpoints, tmp_path, family
):
    folder, data = checkpoints[family]
    secret = tmp_path / "server.secret"
    secret.write_text(f"hf {family}")
    run = run_in_process(
        {
            "server-secret-file": str(secret),
            "output-dir": str(tmp_path / "out"),
            "run-name": family,
            "dataset": FAMILIES[family][0],
            "data-dir": str(data),
            "model": f"hf:{folder}",
            "max-length": 32,
            "num-server-rounds": 2,
            "pretrain-epochs": 0,
            "optimizer": "adamw",
            "learning-rate": 0.002,
            "batch-size": 8,
            "local-epochs": 3,
            "server-mask-ratio": 0.2,
            "min-nodes": 3,
            "fraction-evaluate": 0.0,
        },
        num_nodes=3,
    )
    rows = read_metrics(run / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(r["num_aggregated"] == 3 and r["num_failures"] == 0 for r in rows[1:])
    assert rows[-1]["global_loss"] < rows[0]["global_loss"] - 0.1
    assert rows[-1]["proxy_loss"] < rows[1]["proxy_loss"]
    if family == "gpt2":
        for who in ("global", "server", "proxy"):  # exp of the (mean) loss; 4 decimals kept
            ppl = rows[-1][f"{who}_perplexity"]
            assert math.isclose(ppl, math.exp(rows[-1][f"{who}_loss"]), rel_tol=1e-3)
        assert rows[-1]["proxy_perplexity"] < rows[1]["proxy_perplexity"]
        assert rows[-1]["global_perplexity"] < rows[0]["global_perplexity"]
    else:
        assert math.isnan(rows[-1]["global_perplexity"])
        assert rows[-1]["global_accuracy"] > 0.8

    # no message showed a unit of the server mask: over every client and round,
    # at least p1 of each masked tensor's units were never sent
    messages = load_saved_messages(run)
    seen: dict[str, set[int]] = {}
    for content in messages.values():
        layout = content["proxy-layout"]
        assert "model.lm_head.weight" not in list(layout["tensors"])
        for name, units in message_units(content["proxy"], layout).items():
            seen.setdefault(name, set()).update(units.tolist())
    # the server's start (no pretraining): the checkpoint, and a classification head
    # the checkpoint lacks initialised from the server secret (not the public seed)
    secret = (run / SECRET_FILE).read_bytes()
    spec = _model_and_data(checkpoints, family)[1].spec
    start = build_model(f"hf:{folder}", spec=spec, secret=secret)
    final = torch.load(run / "final_model.pt")
    policy = policy_for_model(start)
    assert set(seen) == set(policy.unit_axes)
    for name, axis in policy.unit_axes.items():
        never = sorted(set(range(policy.unit_counts[name])) - seen[name])
        assert len(never) >= round(0.2 * policy.unit_counts[name])
        # what no client ever saw never moved
        index = torch.tensor(never)
        assert torch.equal(
            final[name].index_select(axis, index),
            start.state_dict()[name].index_select(axis, index),
        ), name
    start.load_state_dict(final)
    if family == "gpt2":
        assert torch.equal(start.model.lm_head.weight, final["model.transformer.wte.weight"])


def test_bad_checkpoints_data_and_configs_are_clear_errors(checkpoints, tmp_path):
    folder, data = checkpoints["gpt2"]
    with pytest.raises(HuggingFaceError, match="no config.json"):
        build_model(f"hf:{tmp_path}", spec=InputSpec("text", (8,), 2, 10))
    # E2E rows need a causal language model, and have no class to partition by
    with pytest.raises(ConfigError, match="causal language models"):
        validate({**DEFAULTS, "dataset": "e2e_nlg", "model": "transformer"})
    with pytest.raises(ConfigError, match="partitioning = 'iid'"):
        validate(
            {**DEFAULTS, "dataset": "e2e_nlg", "model": f"hf:{folder}", "partitioning": "dirichlet"}
        )
    with pytest.raises(ConfigError, match="model"):
        validate({**DEFAULTS, "model": "hf:"})
    with pytest.raises(ConfigError, match="at least 2"):
        validate({**DEFAULTS, "dataset": "e2e_nlg", "model": f"hf:{folder}", "max-length": 1})
    with pytest.raises(HuggingFaceError, match="more than model"):
        load_raw_and_build = load_raw(
            DataKey("e2e_nlg", data_dir=str(data), max_length=200, tokenizer=str(folder))
        )
        build_model(f"hf:{folder}", spec=load_raw_and_build.spec)
    minus = tmp_path / "minus"
    write_jsonl(minus / "train.jsonl", [{"sentence": "x", "label": -1}])
    with pytest.raises(DataError, match="negative"):
        load_raw(DataKey("glue/sst2", data_dir=str(minus), tokenizer=str(folder)))
    bad = tmp_path / "bad"
    write_jsonl(bad / "train.jsonl", [{"mr": "name[x]"}])
    with pytest.raises(DataError, match=re.escape("expected columns")):
        load_raw(DataKey("e2e_nlg", data_dir=str(bad), tokenizer=str(folder)))
    write_jsonl(bad / "train.jsonl", [{"mr": "name[x]", "ref": "x ."}, {"mr": "name[y]"}])
    with pytest.raises(DataError, match=re.escape("row 2 has no ['ref']")):
        load_raw(DataKey("e2e_nlg", data_dir=str(bad), tokenizer=str(folder)))
    with pytest.raises(DataError, match="train.csv or train.jsonl"):
        load_raw(DataKey("glue/sst2", data_dir=str(tmp_path / "missing"), tokenizer=str(folder)))
    # a classifier on token targets is refused before anything is trained
    raw = load_raw(DataKey("e2e_nlg", data_dir=str(data), max_length=32, tokenizer=str(folder)))
    with pytest.raises(ValueError, match="language model"):
        build_model("transformer", spec=raw.spec)


def test_glue_pairs_and_the_hashed_tokenizer_without_a_checkpoint(tmp_path):
    """GLUE rows work with this project's own models too (hashed word ids)."""
    rows = [{"sentence1": f"a b {i}", "sentence2": f"c d {i}", "label": i % 2} for i in range(40)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    raw = load_raw(DataKey("glue/mrpc", data_dir=str(tmp_path), max_length=8, vocab_size=64))
    assert raw.spec.task == "classification" and raw.spec.num_classes == 2
    assert raw.train_x.shape == (40, 8) and int((raw.train_x[0] > 0).sum()) == 6
    model = build_model("transformer", spec=raw.spec)
    loss, _ = evaluate(model, Split(raw.train_x, raw.train_y))
    assert math.isfinite(loss)


def test_without_transformers_the_error_names_the_extra(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(HuggingFaceError, match=re.escape("pip install 'fedqsn-flwr[hf]'")):
        build_model(
            f"hf:{checkpoints['gpt2'][0]}", spec=InputSpec("text", (8,), 0, 10, "causal-lm")
        )


@pytest.mark.slow  # a federation, the attacks and the comparison's tables and plots
def test_attacks_comparison_and_plots_report_perplexity_the_right_way_round(checkpoints, tmp_path):
    folder, data = checkpoints["gpt2"]
    secret = tmp_path / "server.secret"
    secret.write_text("hf attacks")
    run = run_in_process(
        {
            "server-secret-file": str(secret),
            "output-dir": str(tmp_path / "runs"),
            "run-name": "fedqsn__seed42",
            "dataset": "e2e_nlg",
            "data-dir": str(data),
            "model": f"hf:{folder}",
            "max-length": 32,
            "num-server-rounds": 2,
            "pretrain-epochs": 2,
            "optimizer": "adamw",
            "learning-rate": 0.002,
            "batch-size": 8,
            "local-epochs": 1,
            "min-nodes": 3,
            "fraction-evaluate": 0.0,
        },
        num_nodes=3,
    )
    report = run_attacks(run, epochs=1, learning_rates=[0.002], max_clients=1)
    assert report["metric"] == "perplexity" and "best_attack_accuracy" not in report
    perplexities = {a["attack"]: a["perplexity"] for a in report["attacks"]}
    # lower is better: the best attack is the lowest perplexity, and a positive gap
    # means the attackers are worse off than the server
    assert report["best_attack_perplexity"] == min(perplexities.values())
    assert report["privacy_gap"] == pytest.approx(
        report["best_attack_perplexity"] - report["global_perplexity"]
    )
    for attack in report["attacks"]:
        assert attack["perplexity"] == pytest.approx(math.exp(-attack["score"]))
    global_loss = math.log(report["global_perplexity"])
    data_only_loss = math.log(report["data_only_perplexity"])
    best_loss = math.log(report["best_attack_perplexity"])
    if report["knowledge_leakage"] is not None:
        assert report["knowledge_leakage"] == pytest.approx(
            (data_only_loss - best_loss) / (data_only_loss - global_loss), rel=1e-3
        )
    text = format_report(report)
    assert "perplexity" in text and "lower is better" in text

    (run / "compare.json").write_text('{"wall_seconds": 1.0}')
    row = compare_row(RunSpec("fedqsn", 42), run)
    assert row["metric"] == "perplexity" and math.isnan(row["best_attack_accuracy"])
    assert row["best_attack_perplexity"] == report["best_attack_perplexity"]
    assert row["collusion_attack_perplexity"] == min(
        perplexities["collusion_as_is"], perplexities["collusion_finetune"]
    )
    headline = headline_markdown([row])
    assert "global (perplexity)" in headline
    assert f"{row['global_perplexity']:.3f}" in headline
    assert "global_perplexity" in summary_markdown([row])
    paths = write_plots([row], tmp_path, attacked=True)
    assert {p.name for p in paths} >= {"perplexity_per_round.png", "privacy_utility.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_language_model_never_sees_the_tokens_it_predicts(checkpoints, family):
    """GPT-2, and an encoder checkpoint (RoBERTa) loaded for E2E: causal attention."""
    folder = checkpoints[family][0]
    _, raw = _model_and_data(checkpoints, "gpt2")
    # the E2E rows tokenized by this family's own tokenizer
    key = DataKey("e2e_nlg", data_dir=str(checkpoints["gpt2"][1]), max_length=32)
    raw = load_raw(replace(key, tokenizer=str(folder)))
    model = build_model(f"hf:{folder}", seed=0, spec=raw.spec).eval()
    x = raw.train_x[:2].clone()
    with torch.no_grad():
        before = model(x)
        x[:, 20:] = (x[:, 20:] + 1) % raw.spec.vocab_size
        after = model(x)
    assert torch.allclose(before[:, :20], after[:, :20], atol=1e-5)
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def test_a_client_needs_only_the_config_and_the_tokenizer(checkpoints, tmp_path):
    folder, _ = checkpoints["gpt2"]
    light = tmp_path / "no-weights"
    shutil.copytree(folder, light, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    _, raw = _model_and_data(checkpoints, "gpt2")
    client = build_model(f"hf:{light}", spec=raw.spec, pretrained=False)
    server = build_model(f"hf:{folder}", spec=raw.spec)
    assert client.state_dict().keys() == server.state_dict().keys()
    with pytest.raises(HuggingFaceError, match="cannot be loaded"):
        build_model(f"hf:{light}", spec=raw.spec)  # the server needs the weights


def test_bert_pairs_get_their_segment_ids(tmp_path):
    texts = [f"a b {i} c d" for i in range(20)]
    folder = save_tiny_checkpoint(tmp_path / "bert", "bert", texts)
    rows = [{"sentence1": f"a b {i}", "sentence2": "c d", "label": i % 2} for i in range(20)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    raw = load_raw(
        DataKey("glue/mrpc", str(tmp_path / "data"), max_length=12, tokenizer=str(folder))
    )
    model = build_model(f"hf:{folder}", seed=0, spec=raw.spec).eval()
    tokenizer = load_tokenizer(str(folder))
    expected = tokenizer(
        ["a b 0"],
        ["c d"],
        padding="max_length",
        max_length=12,
        return_tensors="pt",
        return_token_type_ids=True,
    )
    assert torch.equal(raw.train_x[:1], expected["input_ids"])
    with torch.no_grad():
        got = model(raw.train_x[:1])
        reference = model.model(
            input_ids=expected["input_ids"],
            attention_mask=expected["attention_mask"],
            token_type_ids=expected["token_type_ids"],
        ).logits
    assert expected["token_type_ids"].sum() > 0
    assert torch.allclose(got, reference, atol=1e-6)


def test_hub_rows_through_flwr_datasets(checkpoints, monkeypatch):
    """The hub branches, with flwr-datasets' FederatedDataset answering from memory."""
    import flwr_datasets
    from datasets import Dataset

    asked = []

    class Hub:
        def __init__(self, *, dataset, subset=None, partitioners, shuffle):
            asked.append((dataset, subset))
            self.dataset = dataset

        def load_split(self, split):
            asked.append(split)
            if self.dataset == "tuetschek/e2e_nlg":
                return Dataset.from_list(e2e_rows(8, seed=len(asked)))
            return Dataset.from_list(sst2_rows(8, seed=len(asked)))

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", Hub)
    folder = checkpoints["gpt2"][0]
    e2e = load_raw(DataKey("e2e_nlg", max_length=32, tokenizer=str(folder)))
    assert e2e.spec.task == "causal-lm" and e2e.train_x.shape == (8, 32)
    sst2 = load_raw(DataKey("glue/sst2", max_length=16, tokenizer=str(checkpoints["roberta"][0])))
    assert sst2.spec.num_classes == 2 and sst2.test_x.shape == (8, 16)
    assert asked == [
        ("tuetschek/e2e_nlg", None),
        "train",
        "test",
        ("nyu-mll/glue", "sst2"),
        "train",
        "validation",
    ]
