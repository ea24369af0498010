"""Hugging Face models and tokenizers from a local checkpoint folder (``model = "hf:<folder>"``).

The folder is what ``save_pretrained`` writes (``config.json``, the weights,
and the tokenizer's files), e.g. a downloaded ``roberta-base`` or ``gpt2``.
Nothing is downloaded: everything is read with ``local_files_only=True``.

The task comes from the data, as in the paper's two settings:

* class labels (GLUE-style rows, ``text`` files, ``sst2``...): sequence
  classification (``AutoModelForSequenceClassification``, RoBERTa/BERT family;
  a classification head the checkpoint lacks is initialised from torch's
  generator, which the server seeds from its secret);
* token targets (E2E-style rows): causal language modelling
  (``AutoModelForCausalLM``, GPT-2 family; an encoder checkpoint is loaded with
  ``is_decoder=True``, so that no position sees the tokens it predicts),
  judged by token loss and perplexity.

The server loads the checkpoint's weights (its starting point, before its
private fine-tuning); a client builds the architecture from ``config.json``
alone (``pretrained=False``): the weights it trains come in the proxy. A
checkpoint's weights are public, though: masking hides only what the server's
private training changed in them (see docs/experiments.md).

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

from fedqsn_flwr.app.base import CAUSAL_LM, HF_PREFIX
from fedqsn_flwr.core.masking import tied_state_once


#: ``model`` values starting with this name a local checkpoint folder.
class HuggingFaceError(ValueError):
    """A checkpoint folder that cannot be used (the message says what to do)."""


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
    sep_token_id : int, optional
        For models with segment embeddings (BERT): tokens after the first
        separator are the second sentence of a pair (token type 1).

    """

    def __init__(
        self, model: nn.Module, pad_token_id: int, task: str, sep_token_id: int | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.task = task
        self.sep_token_id = sep_token_id
        tied_state_once(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, T) token ids."""
        attention = (x != self.pad_token_id).long()
        # a row of only padding would attend to nothing
        attention[:, 0] = 1
        extra: dict[str, torch.Tensor] = {}
        if self.sep_token_id is not None:
            # the tokenizer's token_type_ids, rebuilt: 1 after the first separator
            sep = (x == self.sep_token_id).long()
            extra["token_type_ids"] = ((sep.cumsum(dim=1) - sep) > 0).long()
        return self.model(input_ids=x, attention_mask=attention, **extra).logits


def _positions(config: Any) -> int | None:
    """Token positions the model can embed (None when it does not say)."""
    positions = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None
    )
    if positions is None:
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        positions -= int(config.pad_token_id) + 1  # their position ids start after padding
    return int(positions)


def load_hf_model(
    name: str,
    task: str,
    num_classes: int,
    vocab_size: int,
    max_length: int = 0,
    pretrained: bool = True,
) -> HuggingFaceModel:
    """The model of ``hf:<folder>`` for ``task``, wrapped as :class:`HuggingFaceModel`.

    ``pretrained`` False builds the architecture from ``config.json`` alone
    (random weights: a client, whose weights come in the proxy). Seed torch
    first: new weights (a classification head the checkpoint lacks) come from
    torch's generator. ``max_length`` (tokens per example) is checked against
    the positions the model embeds.
    """
    transformers = _transformers()
    folder = hf_folder(name)
    tokenizer = load_tokenizer(str(folder))
    auto = (
        transformers.AutoModelForCausalLM
        if task == CAUSAL_LM
        else transformers.AutoModelForSequenceClassification
    )
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if task == CAUSAL_LM:
            if hasattr(config, "is_decoder"):
                config.is_decoder = True  # an encoder checkpoint: causal attention
        else:
            config.num_labels = num_classes
            config.pad_token_id = tokenizer.pad_token_id  # GPT-2 classifiers need one
        if pretrained:
            model = auto.from_pretrained(str(folder), config=config, local_files_only=True)
        else:
            model = auto.from_config(config)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = ""
        if pretrained and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            hint = (
                "; the folder holds no weights: set hf-weights = false to initialise its "
                "architecture from the server secret"
            )
        raise HuggingFaceError(
            f"model '{name}' cannot be loaded for {task}: {first}{hint}"
        ) from err
    embeddings = model.get_input_embeddings().weight.shape[0]
    if vocab_size > embeddings:
        raise HuggingFaceError(
            f"model '{name}': the tokenizer has {vocab_size} tokens but the model embeds "
            f"{embeddings}; save the model and tokenizer together"
        )
    positions = _positions(model.config)
    if positions is not None and max_length > positions:
        raise HuggingFaceError(
            f"max-length {max_length} is more than model '{name}' can embed ({positions} "
            "positions); lower max-length"
        )
    sep = None
    if getattr(model.config, "type_vocab_size", 1) > 1 and tokenizer.sep_token_id is not None:
        sep = int(tokenizer.sep_token_id)
    return HuggingFaceModel(model, tokenizer.pad_token_id, task, sep)
