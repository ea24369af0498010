"""Tiny Hugging Face checkpoints and GLUE/E2E-style files, built offline in a test.

The models are randomly initialised from a config (RoBERTa and GPT-2 families),
the tokenizer is a word-level vocabulary trained by the ``tokenizers`` library on
the rows themselves; both are written with ``save_pretrained`` like a real
checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice", "brilliant", "fun"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "terrible", "sad"]
FILLER = ["the", "film", "was", "plot", "acting", "really", "quite", "a", "story", "and"]
NAMES = ["Alimentum", "Aromi", "Bibimbap", "Blue Spice", "Cocum", "Fitzbillies", "Giraffe"]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese", "fast food"]
AREAS = ["city centre", "riverside"]


def sst2_rows(count: int, seed: int) -> list[dict[str, object]]:
    """SST-2-like rows: a sentence whose sentiment words decide its label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def e2e_rows(count: int, seed: int) -> list[dict[str, str]]:
    """E2E-like rows: a meaning representation and a templated reference."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        name, food, area = rng.choice(NAMES), rng.choice(FOODS), rng.choice(AREAS)
        rows.append(
            {
                "meaning_representation": f"name[{name}], food[{food}], area[{area}]",
                "human_reference": f"{name} serves {food} food in the {area} .",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row_texts(rows: list[dict[str, object]]) -> list[str]:
    return [" ".join(str(v) for v in row.values()) for row in rows]


def _tokenizer(texts: list[str], family: str):  # noqa: ANN202 - transformers' class
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special))
    if family in ("roberta", "bert"):
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
    )


def save_tiny_checkpoint(
    folder: Path, family: str, texts: list[str], width: int = 32, layers: int = 2
) -> Path:
    """A randomly initialised RoBERTa, BERT or GPT-2 and its tokenizer, saved like a checkpoint."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    tokenizer = _tokenizer(texts, family)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    # the encoder families' shared sizes
    encoder = {
        "vocab_size": vocab,
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": 2 * width,
        "pad_token_id": tokenizer.pad_token_id,
        "num_labels": 2,
    }
    if family == "roberta":
        config = RobertaConfig(
            **encoder,
            max_position_embeddings=128 + tokenizer.pad_token_id + 1,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        )
        model = RobertaForSequenceClassification(config)
    elif family == "bert":
        config = BertConfig(**encoder, max_position_embeddings=128, type_vocab_size=2)
        model = BertForSequenceClassification(config)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=width,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
