"""Privacy metrics and attacks: exposure bound, collusion, fine-tuning, determinism."""

import json
import os
import stat

import pytest
import torch
from flwr.app import ArrayRecord, MessageType

import fedqsn_flwr.experiments.attack as attack
from fedqsn_flwr.app.base import InputSpec, Split
from fedqsn_flwr.app.config import validate
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.results import load_saved_messages
from fedqsn_flwr.app.server import build_strategy, train_config
from fedqsn_flwr.app.sources import DataKey, data_key, generate_mnist1d
from fedqsn_flwr.app.splits import input_spec, load_server_data
from fedqsn_flwr.app.training import evaluate
from fedqsn_flwr.core.masking import policy_for_model
from fedqsn_flwr.core.secret import SECRET_FILE
from fedqsn_flwr.experiments.attack import (
    ACCURACY,
    CACHE_VERSION,
    Metric,
    cached,
    collude,
    data_only_reference,
    finetune,
    knowledge_leakage,
    main,
    message_order,
    model_files_digest,
    public_corpus_reference,
    run_attacks,
)
from fedqsn_flwr.experiments.inprocess import run_in_process
from fedqsn_flwr.flower.privacy import hidden_units, to_global_units
from fedqsn_flwr.flower.proxy import received_model
from fedqsn_flwr.flower.strategies import FedQSN
from tests.helpers import TEST_SECRET, LocalGrid, client_split

MARK = 1.0e4


def _federation(base_config, rounds=3, p1=0.3, p2=0.3, plant=True, strategy="fedqsn"):
    config = validate(
        {
            **base_config,
            "fraction-evaluate": 0.5,
            "min-nodes": 3,
            "server-mask-ratio": p1,
            "client-mask-ratio": p2,
            "strategy": strategy,
        }
    )
    torch.manual_seed(0)
    model = build_model("cnn")
    strat = build_strategy(config, model, None, server_secret=TEST_SECRET)
    state = model.state_dict()
    hidden = {}
    if plant and isinstance(strat, FedQSN) and strat.policy.unit_axes:
        hidden = hidden_units(strat.server_mask, strat.policy)
        for name, idx in hidden.items():
            axis = strat.policy.unit_axes[name]
            state[name].index_fill_(axis, idx, MARK)
    grid = LocalGrid(3, config)
    result = strat.start(
        grid, ArrayRecord(state), num_rounds=rounds, train_config=train_config(config)
    )
    return strat, grid, result, hidden


def _received(grid):
    """What the clients received, keyed (round, partition), from the messages."""
    out = {}
    for message in grid.sent:
        kind = message.metadata.message_type
        if kind in (MessageType.TRAIN, MessageType.EVALUATE):
            server_round = int(message.content["config"]["server-round"])
            partition = grid.partition(message.metadata.dst_node_id)
            out[(server_round, kind, partition)] = received_model(message.content)
    return out


@pytest.mark.slow
def test_collusion_of_every_message_recovers_nothing_of_the_hidden_units(base_config):
    strategy, grid, result, hidden = _federation(base_config)
    proxies = _received(grid)
    kinds = [k for _, k, _ in proxies]
    assert kinds.count(MessageType.TRAIN) == 9 and kinds.count(MessageType.EVALUATE) >= 3
    public = {n: torch.full_like(t, 7.0) for n, t in result.arrays.to_torch_state_dict().items()}
    for fill, expected in ((None, 0.0), (public, 7.0)):
        model, seen = collude(proxies, fill)
        assert max(float(t.abs().max()) for t in model.values()) < MARK / 10
        for name, idx in hidden.items():
            axis = strategy.policy.unit_axes[name]
            assert not seen[name].index_select(axis, idx).any(), name
            assert torch.all(model[name].index_select(axis, idx) == expected), name
            visible = strategy.server_mask[name]
            assert seen[name].index_select(axis, visible).all(), "all visible units got out"
    # the server still holds the planted values: they never left it
    final = result.arrays.to_torch_state_dict()
    for name, idx in hidden.items():
        assert torch.all(final[name].index_select(strategy.policy.unit_axes[name], idx) == MARK)


def test_exposure_grows_but_never_exceeds_its_bound(base_config):
    strategy, _, _, _ = _federation(base_config, rounds=4, p1=0.3, p2=0.5, plant=False)
    bound = strategy.exposure_bound
    assert 0.69 < bound < 0.71  # 1 - 0.3 * (share of parameters in masked tensors, 99%)
    exposures = [strategy.round_log[r]["exposure"] for r in range(1, 5)]
    assert all(e <= bound + 1e-12 for e in exposures)
    assert exposures == sorted(exposures) and exposures[0] < exposures[-1]
    assert exposures[-1] == pytest.approx(bound, abs=0.02)
    for r in range(1, 5):
        log = strategy.round_log[r]
        assert 0 < log["cosine_all"] < 1 and 0 < log["rel_l2_all"] < 1
    fedq, _, _, _ = _federation(base_config, rounds=1, strategy="fedq", plant=False)
    assert fedq.round_log[1]["exposure"] == 1.0 == fedq.exposure_bound
    assert fedq.round_log[1]["cosine_all"] > 0.99  # 4-bit codes, no masks


def _server_test(config):
    """The server's test set of the digits federation (what the attacks are scored on)."""
    return load_server_data(
        "digits", seed=config["seed"], test_fraction=0.2, pretrain_fraction=0.1, secret=TEST_SECRET
    ).test


def test_finetuning_attack_improves_on_the_proxy_as_is(base_config):
    strategy, grid, _, _ = _federation(base_config, rounds=1, p1=0.5, p2=0.5, plant=False)
    proxy = _received(grid)[(1, MessageType.TRAIN, 0)]
    test = _server_test(base_config)
    own = client_split("digits", base_config["seed"], 0.2, 0.1, 0, 3)[0]
    model = build_model("cnn")
    model.load_state_dict(proxy.state)
    as_is = evaluate(model, test)[1]
    tuned, rate, epoch = finetune(
        model, proxy.state, own, test, epochs=3, learning_rates=[0.02], seed=1
    )
    assert tuned > as_is + 0.02 and epoch >= 1 and rate == 0.02


def test_patience_stops_a_learning_rate_and_the_best_state_is_kept(base_config):
    test = _server_test(base_config)
    own = client_split("digits", base_config["seed"], 0.2, 0.1, 0, 3)[0]
    model = build_model("cnn", seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    epochs_run = []
    real_evaluate = ACCURACY.evaluate

    def counting(metric, net, data):
        epochs_run.append(1)
        return real_evaluate(net, data)

    # a learning rate that wrecks the model never beats epoch 1: patience 1 stops it there
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(ACCURACY), "evaluate", counting)
        kept: dict = {}
        score, rate, epoch = finetune(
            model, start, own, test, 6, [50.0, 0.05], 1, patience=1, best_state=kept
        )
    assert len(epochs_run) < 1 + 6 + 6  # epoch 0, then fewer than all 12 epochs
    model.load_state_dict(kept)
    assert evaluate(model, test)[1] == pytest.approx(score)
    assert rate == 0.05 and epoch >= 1


def test_references_are_cached_by_recipe_and_data(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"score": 0.5, "state": {"w": torch.ones(2)}}

    data = [torch.arange(4)]
    first = cached(tmp_path / "cache", {"a": 1}, data, compute)
    again = cached(tmp_path / "cache", {"a": 1}, data, compute)
    assert len(calls) == 1 and again["score"] == 0.5
    assert torch.equal(again["state"]["w"], first["state"]["w"])
    cached(tmp_path / "cache", {"a": 1}, [torch.arange(5)], compute)  # other data
    cached(tmp_path / "cache", {"a": 2}, data, compute)  # other recipe
    cached(None, {"a": 1}, data, compute)  # no cache
    assert len(calls) == 4
    assert all(f.stat().st_mode & 0o077 == 0 for f in (tmp_path / "cache").iterdir())


def _without_timings(round_log):
    return {
        r: {k: v for k, v in entry.items() if not k.endswith("_seconds")}
        for r, entry in round_log.items()
    }


def test_privacy_metrics_are_deterministic(base_config):
    logs = []
    for _ in range(2):
        # The in-process clients switch torch to one thread; start both runs there
        # so the server's float64 reductions run with the same thread count.
        torch.set_num_threads(1)
        logs.append(_without_timings(_federation(base_config, rounds=2, plant=False)[0].round_log))
    assert logs[0] == logs[1]


@pytest.mark.slow
@pytest.mark.xdist_group("saved_run")  # one worker builds the shared run
def test_attack_command_on_a_real_run_is_deterministic(saved_run, capsys):
    run = saved_run
    assert main(["--run", str(run), "--epochs", "2", "--max-clients", "2"]) == 0
    first = json.loads((run / "attacks.json").read_text())
    assert "best attack:" in capsys.readouterr().out
    names = [a["attack"] for a in first["attacks"]]
    assert names == [
        "proxy_as_is",
        "finetune",
        "collusion_as_is",
        "collusion_finetune",
        "public_fill_as_is",
        "public_fill_finetune",
    ]
    assert first["best_attack_accuracy"] == max(a["accuracy"] for a in first["attacks"])
    assert first["privacy_gap"] == pytest.approx(
        first["global_accuracy"] - first["best_attack_accuracy"]
    )
    # the data-only reference: the run's model from a public init on the pooled data
    reference = first["pooled_data_only"]
    assert set(reference["tried"]) == {"cnn"} and first["data_only_accuracy"] == max(
        reference["tried"].values()
    )
    if first["no_model_knowledge"]:
        assert first["knowledge_leakage"] is None
        assert first["global_accuracy"] <= first["data_only_accuracy"] + 0.02
    else:
        assert first["knowledge_leakage"] == pytest.approx(
            (first["best_attack_accuracy"] - first["data_only_accuracy"])
            / (first["global_accuracy"] - first["data_only_accuracy"])
        )
    second = run_attacks(run, epochs=2, max_clients=2)
    assert second == first


def test_knowledge_leakage_and_the_data_only_reference():
    assert knowledge_leakage(0.80, 0.70, 0.90) == pytest.approx(0.5)
    assert knowledge_leakage(0.65, 0.70, 0.90) == pytest.approx(-0.25)  # below data only
    assert knowledge_leakage(0.95, 0.70, 0.71) is None  # nothing to protect
    assert knowledge_leakage(0.95, 0.70, 0.72) is None
    key = DataKey("mnist1d")
    spec = input_spec(key)
    pooled = Split(torch.randn(60, 1, 40), torch.arange(60) % 10)
    test = Split(torch.randn(40, 1, 40), torch.arange(40) % 10)
    config = {"model": "mlp512", "dropout": 0.0, "seed": 1}
    reference = data_only_reference(config, spec, pooled, test, 1, [0.01])
    assert set(reference["tried"]) == {"mlp512", "cnn1d"}  # the run's model and a small CNN
    assert reference["accuracy"] == max(reference["tried"].values())
    assert reference["model"] in reference["tried"]


def _mnist1d_split(raw):
    return Split(raw.train_x, raw.train_y)


def test_on_mnist1d_the_data_only_reference_includes_the_public_generator():
    """The server's MNIST-1D data comes from a generator every client can run."""
    spec = input_spec(DataKey("mnist1d"))
    test = _mnist1d_split(generate_mnist1d(300, 5, 1.25))
    pooled = _mnist1d_split(generate_mnist1d(60, 6, 1.25))
    config = {
        "dataset": "mnist1d",
        "model": "mlp512",
        "dropout": 0.0,
        "seed": 1,
        "pretrain-epochs": 3,
        "mnist1d-server-examples": 2000,
        "learning-rate": 0.05,
        "batch-size": 32,
    }
    reference = data_only_reference(config, spec, pooled, test, 1, [0.01])
    tried = reference["tried"]
    assert set(tried) == {"mlp512", "cnn1d", "public-generator+mlp512", "public-generator"}
    # pretrained on public signals it beats the same MLP trained on 60 examples alone
    assert tried["public-generator"] > tried["mlp512"] + 0.1
    assert tried["public-generator+mlp512"] >= tried["public-generator"]
    assert reference["accuracy"] == max(tried.values())


def test_attack_needs_saved_messages(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "federation.yaml").write_text("num-partitions: 2\n")
    assert main(["--run", str(tmp_path)]) == 2
    assert "save-messages" in capsys.readouterr().err


def test_policy_for_fedq_has_no_hidden_units():
    policy = policy_for_model(build_model("cnn"))
    assert (
        hidden_units({n: torch.arange(c) for n, c in policy.unit_counts.items()}, policy)[
            "fc1.weight"
        ].numel()
        == 0
    )


def test_patience_runs_exactly_the_epochs_its_rule_allows(monkeypatch):
    """A scripted score per epoch: patience 2 stops each rate after 2 epochs without a best."""
    trained = []
    monkeypatch.setattr(attack, "train", lambda *args, **kwargs: trained.append(args[3]))
    # epoch 0, then rate 0.1: new bests at epochs 1 and 2, none at 3 and 4 -> stops after 4;
    # rate 0.2: its own best at epoch 1, none at 2 and 3 -> stops after 3 (of 6 each)
    scores = iter([0.1, 0.2, 0.3, 0.25, 0.28, 0.15, 0.1, 0.12, 0.9, 0.9, 0.9])
    monkeypatch.setattr(Metric, "evaluate", lambda self, model, data: next(scores))
    model = torch.nn.Linear(2, 2)
    found = finetune(model, model.state_dict(), None, None, 6, [0.1, 0.2], 1, patience=2)
    assert trained == [0.1] * 4 + [0.2] * 3
    assert found == (0.3, 0.1, 2)
    assert next(scores) == 0.9  # nothing scored past the stops
    # without patience every epoch of every rate runs
    trained.clear()
    scores = iter([0.0] * 13)
    finetune(model, model.state_dict(), None, None, 6, [0.1, 0.2], 1)
    assert len(trained) == 12


def test_patience_must_be_at_least_one(tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="patience"):
            finetune(model, model.state_dict(), None, None, 1, [0.1], 1, patience=bad)
        with pytest.raises(ValueError, match="patience"):
            run_attacks(tmp_path, patience=bad)  # before any file is read
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exit_:
            main(["--run", str(tmp_path), "--patience", bad])
        assert exit_.value.code == 2 and "integer >= 1" in capsys.readouterr().err


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _tiny_run(tmp_path, strategy="fedavg", name="tiny"):
    """One round of 2 in-process clients on digits, every message saved."""
    secret = tmp_path / "server.secret"
    secret.write_text("attacks")
    return run_in_process(
        {
            "server-secret-file": str(secret),
            "output-dir": str(tmp_path / "out"),
            "run-name": name,
            "strategy": strategy,
            "num-server-rounds": 1,
            "pretrain-epochs": 1,
            "local-epochs": 1,
            "min-nodes": 2,
            "fraction-evaluate": 1.0,  # the evaluate messages: the newest global model
            "seed": 3,
        },
        num_nodes=2,
    )


def _score(run, state):
    """The accuracy of ``state`` on the run's server test set (the scorer's view)."""
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    data = load_server_data(
        data_key(config),
        seed=config["seed"],
        test_fraction=config["test-fraction"],
        pretrain_fraction=config["pretrain-fraction"],
        secret=(run / SECRET_FILE).read_bytes(),
    )
    model = build_model(config["model"], config["dropout"], spec=data.spec)
    model.load_state_dict(state)
    return evaluate(model, data.test)[1]


def test_collusion_keeps_the_newest_message_of_a_round(tmp_path):
    run = _tiny_run(tmp_path)
    proxies = {key: received_model(content) for key, content in load_saved_messages(run).items()}
    assert {kind for _, kind, _ in proxies} == {"train", "evaluate"}
    model, seen = collude(proxies)
    # FedAvg sends everything: round 1's evaluate message holds the model trained in
    # round 1, newer than the train message sent before it (a plain sort of the keys
    # puts "evaluate" first and let the older model win)
    newest = to_global_units(proxies[(1, "evaluate", 1)])
    oldest = to_global_units(proxies[(1, "train", 1)])
    assert all(seen[name].all() for name in model)
    assert all(torch.equal(model[name], newest[name]) for name in newest)
    assert any(not torch.equal(newest[name], oldest[name]) for name in newest)
    keys = sorted(proxies, key=message_order)
    assert [k[1] for k in keys] == ["train", "train", "evaluate", "evaluate"]


def test_saved_models_are_what_the_report_names_and_the_cache_is_reused(tmp_path, monkeypatch):
    run = _tiny_run(tmp_path)
    stale = run / "attack-models"
    stale.mkdir()
    (stale / "public_corpus.pt").write_bytes(b"an earlier call's")
    (stale / "old.pt").write_bytes(b"")
    cache = tmp_path / "cache"
    # the colluders' newest messages are the evaluate ones (FedAvg: the model after
    # round 1), so their as-is model beats the last training proxy; with no
    # fine-tuning epochs every *_finetune ties with its as-is model, and the first
    # of a tie is the best
    report = run_attacks(run, epochs=0, max_clients=1, save_models=True, cache_dir=cache)
    scores = {a["attack"]: a["score"] for a in report["attacks"]}
    assert report["best_attack"] == "collusion_as_is"
    assert scores["collusion_as_is"] == scores["collusion_finetune"] > scores["proxy_as_is"]
    files = {f.name: _mode(f) for f in stale.iterdir()}
    assert files == {"best_attack.pt": 0o600, "data_only.pt": 0o600}  # stale ones gone
    assert _mode(stale) == 0o700
    best = torch.load(stale / "best_attack.pt", weights_only=True)
    assert _score(run, best) == pytest.approx(report["best_attack_accuracy"])
    data_only = torch.load(stale / "data_only.pt", weights_only=True)
    assert _score(run, data_only) == pytest.approx(report["data_only_accuracy"])
    cached_files = {f.suffix: _mode(f) for f in cache.iterdir()}
    assert cached_files == {".json": 0o600, ".pt": 0o600} and _mode(cache) == 0o700

    def no_reference(*args, **kwargs):
        raise AssertionError("the cached reference should have been reused")

    monkeypatch.setattr(attack, "data_only_reference", no_reference)
    again = run_attacks(run, epochs=0, max_clients=1, save_models=True, cache_dir=cache)
    assert again == report
    assert torch.equal(
        torch.load(stale / "data_only.pt", weights_only=True)["fc1.weight"],
        data_only["fc1.weight"],
    )
    # without save_models the earlier call's models, which no longer match, are removed
    monkeypatch.undo()
    run_attacks(run, epochs=0, max_clients=1)
    assert list(stale.iterdir()) == []


def test_the_saved_best_attack_scores_as_reported_on_a_masked_run(tmp_path, monkeypatch):
    run = _tiny_run(tmp_path, strategy="fedqsn")
    report = run_attacks(run, 1, [0.02], 2, patience=1, save_models=True)
    best = torch.load(run / "attack-models" / "best_attack.pt", weights_only=True)
    assert _score(run, best) == pytest.approx(report["best_attack_accuracy"])
    assert report["best_attack_accuracy"] == max(a["accuracy"] for a in report["attacks"])

    # a best attack without weights is an error, and nothing is written
    def weightless(*args, best_state=None, **kwargs):
        return 2.0, 0.02, 1  # better than any accuracy, best_state left empty

    monkeypatch.setattr(attack, "finetune", weightless)
    (run / "attacks.json").unlink()
    with pytest.raises(RuntimeError, match="no weights were kept for the best attack 'finetune'"):
        run_attacks(run, 1, [0.02], 2, save_models=True)
    assert not (run / "attacks.json").exists()
    assert (run / "attack-models" / "best_attack.pt").exists()  # the earlier call's, untouched


def test_public_fill_is_collusion_when_every_parameter_was_seen(tmp_path):
    run = _tiny_run(tmp_path)
    report = run_attacks(run, epochs=1, learning_rates=[0.02], max_clients=1)
    rows = {a["attack"]: a for a in report["attacks"]}
    for kind in ("as_is", "finetune"):
        fill, collusion = rows[f"public_fill_{kind}"], rows[f"collusion_{kind}"]
        assert fill["score"] == collusion["score"]
        assert fill["accuracy"] == collusion["accuracy"]
        assert fill["detail"] == "every parameter seen: = collusion"
    assert "1.0000 of the parameters seen" in rows["collusion_as_is"]["detail"]


def test_the_reference_cache_key_holds_the_version_and_the_server_recipe(tmp_path, monkeypatch):
    run = _tiny_run(tmp_path)
    described = []
    real = attack.cached

    def spy(cache_dir, recipe, tensors, compute):
        described.append(dict(recipe))
        return real(cache_dir, recipe, tensors, compute)

    monkeypatch.setattr(attack, "cached", spy)
    run_attacks(run, epochs=0, max_clients=1, cache_dir=tmp_path / "cache")
    (recipe,) = described
    assert recipe["cache-version"] == CACHE_VERSION and recipe["reference"] == "data-only"
    assert recipe["pretrain-epochs"] == 1 and recipe["learning-rate"] == 0.05
    assert recipe["batch-size"] == 32 and recipe["mnist1d-server-examples"] == 20_000
    assert recipe["model-files"] is None  # not a Hugging Face folder


def test_a_model_folder_changed_in_place_changes_the_cache_key(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text('{"n_layer": 2}')
    (folder / "model.safetensors").write_bytes(b"weights")
    first = model_files_digest(f"hf:{folder}")
    assert model_files_digest(f"hf:{folder}") == first
    stat_before = (folder / "config.json").stat()
    (folder / "config.json").write_text('{"n_layer": 4}')  # same path, same size
    os.utime(folder / "config.json", ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 1))
    assert model_files_digest(f"hf:{folder}") != first
    assert model_files_digest("cnn") is None


def test_the_public_corpus_reference_pretrains_then_fine_tunes_reproducibly(tmp_path):
    pytest.importorskip("transformers")
    from tests.hf_helpers import save_tiny_checkpoint

    words = [f"w{i}" for i in range(20)]
    folder = save_tiny_checkpoint(tmp_path / "gpt2", "gpt2", [" ".join(words)], 16, 1)
    vocab = 25  # 5 special tokens and the 20 words
    spec = InputSpec("text", (16,), 0, vocab, "causal-lm")

    def blocks(count, seed):
        # brown-like text a model learns: counting up through the words, from a random start
        starts = torch.randint(0, 20, (count, 1), generator=torch.Generator().manual_seed(seed))
        x = 5 + (starts + torch.arange(16)) % 20
        return Split(x, x.clone())

    config = {
        "model": f"hf:{folder}",
        "hf-weights": False,
        "dropout": 0.0,
        "seed": 4,
        "optimizer": "adamw",
        "pretrain-epochs": 3,
        "learning-rate": 0.01,
        "batch-size": 16,
    }
    perplexity = Metric("perplexity")
    corpus, pooled, test = blocks(128, 1), blocks(16, 2), blocks(32, 3)
    budget = (1, [1e-3], None)
    found = public_corpus_reference(
        config, spec, corpus, pooled, test, budget, perplexity, keep_state=True
    )
    fresh = build_model(config["model"], 0.0, seed=0, spec=spec, pretrained=False)
    assert found["as_is"] < perplexity.value(perplexity.evaluate(fresh, test)) / 2
    assert found["perplexity"] <= found["as_is"]  # epoch 0 is the pretrained model
    assert perplexity.evaluate_state(fresh, found["state"], test) == pytest.approx(found["score"])
    again = public_corpus_reference(config, spec, corpus, pooled, test, budget, perplexity)
    assert again == {k: v for k, v in found.items() if k != "state"}
