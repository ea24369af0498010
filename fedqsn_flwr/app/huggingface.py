"""Hugging Face models and tokenizers from a local checkpoint folder (``model = "hf:<folder>"``).

The folder is what ``save_pretrained`` writes (``config.json``, the weights,
and the tokenizer's files), e.g. a downloaded ``roberta-base`` or ``gpt2``.
Nothing is downloaded: everything is read with ``local_files_only=True``.

The task comes from the data, as in the paper's two settings:

* class labels (GLUE-style rows, ``text`` files, ``sst2``...): sequence
  classification (``AutoModelForSequenceClassification``, RoBERTa/BERT family;
  a new classification head is initialised from the run's seed when the
  checkpoint has none);
* token targets (E2E-style rows): causal language modelling
  (``AutoModelForCausalLM``, GPT-2 family), judged by token loss and perplexity.

:class:`HuggingFaceModel` puts the model behind this app's ``model(x) ->
logits`` interface (``x``: token ids, padding = the tokenizer's pad token) and
lists a tied tensor (GPT-2's output head is its token embedding) once in its
state dict (:func:`fedqsn_flwr.core.masking.tied_state_once`). The model's own
dropout settings apply; the ``dropout`` config key does not.

``transformers`` is an optional dependency: ``pip install 'fedqsn-flwr[hf]'``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedqsn_flwr.core.masking import tied_state_once

#: ``model`` values starting with this name a local checkpoint folder.
HF_PREFIX = "hf:"
#: InputSpec tasks.
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
#: Label of a token that is not scored (prompt and padding), as in transformers.
IGNORE_INDEX = -100


class HuggingFaceError(ValueError):
    """A checkpoint folder that cannot be used (the message says what to do)."""


def is_hf(name: str) -> bool:
    """Whether a ``model`` value names a Hugging Face checkpoint folder."""
    return name.startswith(HF_PREFIX)


def hf_folder(name: str) -> Path:
    """The folder of ``hf:<folder>``, checked to hold a ``config.json``."""
    folder = Path(name[len(HF_PREFIX) :]).expanduser()
    if not (folder / "config.json").is_file():
        raise HuggingFaceError(
            f"model '{name}': {folder} holds no config.json; point it at a folder written by "
            "save_pretrained (model and tokenizer), e.g. a local copy of roberta-base or gpt2"
        )
    return folder


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise HuggingFaceError(
            "Hugging Face models need the transformers package: pip install 'fedqsn-flwr[hf]'"
        ) from err
    transformers.logging.set_verbosity_error()  # "newly initialized head" is expected here
    transformers.logging.disable_progress_bar()
    return transformers


@lru_cache(maxsize=4)
def load_tokenizer(folder: str) -> Any:
    """The tokenizer saved in ``folder`` (a pad token is the EOS token when it has none)."""
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise HuggingFaceError(f"cannot load a tokenizer from {folder}: {err}") from err
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise HuggingFaceError(f"the tokenizer in {folder} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2's usual choice
    return tokenizer


class HuggingFaceModel(nn.Module):
    """A ``transformers`` model as ``model(token_ids) -> logits``.

    Parameters
    ----------
    model : nn.Module
        A ``...ForSequenceClassification`` or ``...ForCausalLM`` model.
    pad_token_id : int
        Positions holding this id are padding (attention mask 0).
    task : str
        ``"classification"`` (logits (N, classes)) or ``"causal-lm"`` (logits
        (N, T, vocabulary)).

    """

    def __init__(self, model: nn.Module, pad_token_id: int, task: str) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.task = task
        tied_state_once(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, T) token ids."""
        attention = (x != self.pad_token_id).long()
        # a row of only padding would attend to nothing
        attention[:, 0] = 1
        return self.model(input_ids=x, attention_mask=attention).logits


def load_hf_model(name: str, task: str, num_classes: int, vocab_size: int) -> HuggingFaceModel:
    """The model of ``hf:<folder>`` for ``task``, wrapped as :class:`HuggingFaceModel`.

    Seed torch first: a classification head the checkpoint lacks is initialised
    from torch's generator.
    """
    transformers = _transformers()
    folder = hf_folder(name)
    tokenizer = load_tokenizer(str(folder))
    auto = (
        transformers.AutoModelForCausalLM
        if task == CAUSAL_LM
        else transformers.AutoModelForSequenceClassification
    )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if task != CAUSAL_LM:
        kwargs["num_labels"] = num_classes
        kwargs["pad_token_id"] = tokenizer.pad_token_id  # GPT-2 classifiers need one
    try:
        model = auto.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as err:
        raise HuggingFaceError(f"model '{name}' cannot be loaded for {task}: {err}") from err
    embeddings = model.get_input_embeddings().weight.shape[0]
    if vocab_size > embeddings:
        raise HuggingFaceError(
            f"model '{name}': the tokenizer has {vocab_size} tokens but the model embeds "
            f"{embeddings}; save the model and tokenizer together"
        )
    return HuggingFaceModel(model, tokenizer.pad_token_id, task)
