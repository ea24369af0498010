r"""What the language models write: fixed prompts continued by each model of a comparison.

    python -m fedqsn_flwr.experiments.continuations \\
        --runs results/brown/runs/fedavg__seed0 results/brown/runs/fedqsn__variant=p1=0.5__seed0

A perplexity says how surprised a model is by the test text; people judge a
language model by what it writes. For each run given, this continues
:data:`PROMPTS` greedily (the most likely token each step; no sampling, so the
same weights always write the same text; :data:`NO_REPEAT_NGRAM` stops the
loops greedy decoding falls into) with the run's global model, and once with
the start model they share (the server's pretrained model, from the
``pretrain-cache``). With ``--attacks``, the last run's best attack, data-only
reference and public-corpus reference are continued too (its attack tool run
with ``--save-models`` / the comparison preset's ``attack-save-models``).
Prints a Markdown table (``--out`` also writes it, as a 0600 file: it holds what
the private models write).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from fedqsn_flwr.app.huggingface import hf_folder, load_tokenizer
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.private import write_private
from fedqsn_flwr.app.server import pretrained_path
from fedqsn_flwr.app.splits import server_data
from fedqsn_flwr.core.secret import SECRET_FILE

#: Openings in the style of the clients' imaginative prose (none is a corpus sentence).
PROMPTS = (
    "She opened the door and",
    "The old man looked at the sky",
    "When the sheriff rode into town,",
)
NEW_TOKENS = 30
#: No 3-gram is written twice: greedy decoding of small models otherwise loops.
NO_REPEAT_NGRAM = 3


def continue_prompts(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str] = PROMPTS
) -> list[str]:
    """Greedy continuations of ``prompts`` by a causal LM built by :func:`build_model`."""
    lm = model.model  # the transformers model inside HuggingFaceModel
    lm.eval()
    texts = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            out = lm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                no_repeat_ngram_size=NO_REPEAT_NGRAM,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def _config(run: Path) -> dict[str, Any]:
    return yaml.safe_load((run / "config.yaml").read_text())


def run_models(run: Path, attacks: bool) -> list[tuple[str, Mapping[str, torch.Tensor]]]:
    """(label, weights) of the run's global model (and, with ``attacks``, the attackers')."""
    config = _config(run)
    name = f"{config['strategy']} global ({run.name})"
    models = [(name, torch.load(run / "final_model.pt", weights_only=True))]
    if attacks:
        for file, label in (
            ("best_attack", "best attack"),
            ("data_only", "data only"),
            ("public_corpus", "public corpus"),
        ):
            path = run / "attack-models" / f"{file}.pt"
            if not path.exists():
                if file == "public_corpus":
                    continue  # only where the server's text is public
                raise FileNotFoundError(f"{path} missing: run the attacks with --save-models")
            models.append((f"{label} ({run.name})", torch.load(path, weights_only=True)))
    return models


def start_model(run: Path) -> Mapping[str, torch.Tensor]:
    """The run's pretrained starting model, from its ``pretrain-cache``."""
    config = _config(run)
    path = pretrained_path(config, (run / SECRET_FILE).read_bytes())
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{run}: no cached start model (run with pretrain-cache = true and pretrain-epochs > 0)"
        )
    return torch.load(path, weights_only=True)


def table(runs: Sequence[Path], attacks: bool) -> str:
    """The Markdown table of every model's continuations."""
    config = _config(runs[-1])
    secret = (runs[-1] / SECRET_FILE).read_bytes()
    spec = server_data(config, secret).spec
    model = build_model(config["model"], spec=spec, pretrained=False)
    tokenizer = load_tokenizer(str(hf_folder(config["model"])))
    models = [("start (pretrained, before federating)", start_model(runs[-1]))]
    for index, run in enumerate(runs):
        models += run_models(run, attacks and index == len(runs) - 1)
    lines = ["| model | " + " | ".join(f'"{p}"' for p in PROMPTS) + " |"]
    lines.append("|---" * (len(PROMPTS) + 1) + "|")
    for label, state in models:
        model.load_state_dict(dict(state))
        texts = continue_prompts(model, tokenizer)
        texts = [t.replace("|", "\\|").replace("\n", " / ") for t in texts]
        lines.append(f"| {label} | " + " | ".join(f"…{t}" for t in texts) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fedqsn_flwr.experiments.continuations", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="run folders")
    parser.add_argument("--attacks", action="store_true", help="the last run's attackers too")
    parser.add_argument("--out", type=Path, help="also write the table here (mode 0600)")
    args = parser.parse_args(argv)
    try:
        text = table([r.expanduser() for r in args.runs], args.attacks)
    except (FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        write_private(args.out.expanduser(), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
