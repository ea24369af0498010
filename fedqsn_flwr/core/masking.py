"""Server and client masks over structured units (pure tensor code).

Terminology, as in the paper:

* A *unit* is one slice of a weight tensor along its *unit axis*: an input
  feature (a column of a ``Linear`` weight, axis 1), an input channel of a
  convolution (axis 1). Hiding a unit zeroes that whole slice, i.e. it drops one
  hidden feature coming from the previous layer.
* The *server mask* hides a fraction ``server_mask_ratio`` (the paper's **p1**) of
  the units of every masked tensor, once per run. Hidden units never leave the
  server.
* A *client mask* hides a further fraction ``client_mask_ratio`` (the paper's
  **p2**) of the units the server mask left visible. A fresh one is drawn for
  every sampled client in every round.
* Visible units are scaled by ``num_units / num_visible`` -- the exact form of the
  paper's inverted-dropout factor ``1/(1-p)`` (``1/((1-p1)(1-p2))`` for a client),
  which keeps the expected activation of the next layer unchanged.

The :class:`MaskPolicy` says which tensors are masked and along which axis. The
default (:func:`policy_for_model`) masks the units *between* layers only: the
first weight layer's input (raw pixels) and the output logits are never masked,
as in the authors' code, because hiding input features or classes costs far more
accuracy than hiding hidden features. Per layer type:

* ``nn.Linear`` and ``nn.Conv1d/2d/3d``: axis 1 (input features or channels);
* Hugging Face ``transformers``' ``Conv1D`` (GPT-2's attention and MLP
  projections, weight stored *input x output*): axis 0, its input features;
* ``nn.Embedding``: axis 1, the embedding dimensions (token, position and
  token-type tables). A model that starts with an embedding has no raw-data
  weight layer, so its first projection is masked too;
* LayerNorm, biases and buffers (e.g. position ids) stay whole.

A tensor shared under several names (GPT-2's output head is its token
embedding) must travel once: :func:`tied_state_once` makes a model's state dict
list it under its first name only, and :func:`policy_for_model` refuses a model
whose state dict still lists it twice (two masks of one tensor would show a
client the union of their visible units).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedqsn_flwr.core.secret import derive_seed

#: Visible unit indices per masked tensor name (sorted, int64).
UnitMask = dict[str, torch.Tensor]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class MaskPolicy:
    """Which tensors of a model are masked and quantized.

    Parameters
    ----------
    unit_axes : Mapping[str, int]
        Masked tensors (state-dict names) and the axis along which a unit lies.
    unit_counts : Mapping[str, int]
        Number of units of every masked tensor (its size along the unit axis).
    quantized : frozenset[str]
        Tensors sent as NormalFloat codes (when quantization is on); all other
        tensors are sent in float32.
    tied : Mapping[str, str] (default: empty)
        Names that share another tensor (alias -> the name it travels under);
        informational: aliases are not in the state that travels.
    groups : Mapping[str, str] (default: empty)
        Masked tensors that read the same features (tensor -> group name): the
        tensors of one group share every server and client mask, e.g. all the
        readers of a transformer's residual stream. Unlisted tensors draw alone.

    """

    unit_axes: Mapping[str, int]
    unit_counts: Mapping[str, int]
    quantized: frozenset[str] = field(default_factory=frozenset)
    tied: Mapping[str, str] = field(default_factory=dict)
    groups: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.unit_axes) != set(self.unit_counts):
            raise ValueError("unit_axes and unit_counts must name the same tensors")
        unknown = sorted(set(self.groups) - set(self.unit_axes))
        if unknown:
            raise ValueError(f"groups name tensors that are not masked: {unknown}")
        sizes: dict[str, set[int]] = {}
        for name, group in self.groups.items():
            sizes.setdefault(group, set()).add(self.unit_counts[name])
        uneven = sorted(group for group, counts in sizes.items() if len(counts) > 1)
        if uneven:
            raise ValueError(f"the tensors of a mask group must have as many units: {uneven}")
        negative = sorted(name for name, axis in self.unit_axes.items() if axis < 0)
        if negative:
            raise ValueError(f"unit axes must be 0 or more (count from the front): {negative}")

    def describe(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """What travels how: shares of the parameters, and the tensors by treatment.

        ``masked_share``/``quantized_share`` are shares of the parameters in
        masked/quantized tensors; ``masked`` maps each masked tensor (layer
        numbers written ``*``) to its unit axis, ``whole`` lists what travels
        unmasked, ``tied`` the shared tensors (sent once, under the kept name).
        Print it with :func:`format_description`.
        """
        total = sum(t.numel() for t in state.values())
        masked = sum(state[name].numel() for name in self.unit_axes)
        quantized = sum(state[name].numel() for name in self.quantized)
        return {
            "parameters": float(total),
            "masked_share": masked / total,
            "quantized_share": quantized / total,
            "masked": {_pattern(n): axis for n, axis in self.unit_axes.items()},
            "whole": sorted({_pattern(n) for n in state if n not in self.unit_axes}),
            "tied": dict(self.tied),
        }


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def format_description(description: Mapping[str, Any]) -> str:
    """:meth:`MaskPolicy.describe`'s result as lines of text."""
    lines = [
        f"parameters: {int(description['parameters']):,}  masked share: "
        f"{description['masked_share']:.3f}  quantized share: {description['quantized_share']:.3f}"
    ]
    lines += [f"  masked (axis {axis}): {n}" for n, axis in description["masked"].items()]
    lines += [f"  whole: {n}" for n in description["whole"]]
    lines += [f"  tied: {a} = {n} (travels once)" for a, n in description["tied"].items()]
    return "\n".join(lines)


def shared_tensors(model: nn.Module) -> dict[str, str]:
    """Parameters and buffers listed under several names: alias -> first name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False)]
    named += [*model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        kept = first.setdefault(id(tensor), name)
        if kept != name:
            aliases[name] = kept
    return aliases


def tied_state_once(model: nn.Module) -> nn.Module:
    """Make ``model``'s state dict list every shared tensor once; return ``model``.

    GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight``: ``state_dict()``
    lists it twice, and FedQSN would mask (and send) the two names as two
    tensors. After this call ``state_dict()`` keeps the first name only and
    ``load_state_dict`` accepts a state without the aliases (loading the kept
    name updates both, as they are one tensor). Idempotent.
    """
    aliases = shared_tensors(model)
    if not aliases or getattr(model, "_fedqsn_tied", None) is not None:
        return model

    def drop_aliases(
        module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        for alias in aliases:
            state.pop(prefix + alias, None)

    def allow_missing(module: nn.Module, incompatible: Any) -> None:
        # keys are relative to the module load_state_dict was called on, which
        # may hold this one under a prefix
        missing = incompatible.missing_keys
        for key in list(missing):
            if any(key == alias or key.endswith("." + alias) for alias in aliases):
                missing.remove(key)

    model.register_state_dict_post_hook(drop_aliases)
    model.register_load_state_dict_post_hook(allow_missing)
    model._fedqsn_tied = dict(aliases)
    return model


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): a linear layer whose weight is (in, out);
    # recognised by name so that this module never imports transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


#: Tensors that read a transformer's residual stream (state-dict name patterns):
#: embeddings, the attention's query/key/value and the MLP's up projections, and
#: heads on the stream. GPT-2, BERT/RoBERTa and Llama-style names.
RESIDUAL_READERS = re.compile(
    r"(^|\.)(wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embed_tokens"
    r"|c_attn|c_fc|query|key|value|q_proj|k_proj|v_proj|gate_proj|up_proj"
    r"|intermediate\.dense|lm_head)\.weight$"
)


def policy_for_model(
    model: nn.Module, mask_input_layer: bool = False, shared_residual_mask: bool = False
) -> MaskPolicy:
    """Build the default :class:`MaskPolicy` for ``model``.

    If the model defines ``fedqsn_unit_axes()`` (state-dict name -> unit axis),
    exactly those tensors are masked. Otherwise every ``Linear``/``Conv`` weight
    is masked along axis 1 (its input features or channels), a ``transformers``
    ``Conv1D`` weight along axis 0 and an ``Embedding`` along axis 1 (embedding
    dimensions), except the first weight layer when no embedding comes before
    it -- its input is the raw data -- unless ``mask_input_layer`` is set. Every
    floating-point *parameter* is quantized; floating-point buffers (BatchNorm's
    running statistics) travel in float32, because rounding a running variance
    to a 4-bit level can make it zero.

    With ``shared_residual_mask``, the tensors that read a transformer's
    residual stream (:data:`RESIDUAL_READERS`) share one mask of its
    dimensions, so a proxy lacks the same stream dimensions everywhere instead
    of a different half in every layer.

    Raises
    ------
    ValueError
        The model's state dict lists a shared tensor twice (call
        :func:`tied_state_once` first), or ``fedqsn_unit_axes()`` names a tensor
        the model does not have.

    """
    unit_axes: dict[str, int] = {}
    state = model.state_dict()
    aliases = shared_tensors(model)
    listed_twice = {a: n for a, n in aliases.items() if a in state and n in state}
    if listed_twice:
        raise ValueError(
            f"{type(model).__name__} lists one tensor under several names {listed_twice}; "
            "call fedqsn_flwr.tied_state_once(model) before taking its state, so that the "
            "tensor is masked and sent once"
        )
    declared = getattr(model, "fedqsn_unit_axes", None)
    if callable(declared):
        unit_axes = dict(declared())
        unknown = sorted(set(unit_axes) - set(state))
        if unknown:
            raise ValueError(f"fedqsn_unit_axes() names tensors the model does not have: {unknown}")
    else:
        first = True
        for module_name, module in model.named_modules():
            name = f"{module_name}.weight" if module_name else "weight"
            if name not in state:
                continue  # a tied alias: masked under the name it travels by
            if isinstance(module, nn.Embedding):
                first = False  # what follows an embedding is hidden features
                unit_axes[name] = 1
                continue
            if not isinstance(module, _WEIGHT_LAYERS) and not _is_hf_conv1d(module):
                continue
            if first and not mask_input_layer:
                first = False
                continue
            first = False
            unit_axes[name] = 0 if _is_hf_conv1d(module) else 1
    unit_counts = {name: int(state[name].shape[axis]) for name, axis in unit_axes.items()}
    quantized = frozenset(
        name for name, tensor in model.named_parameters() if tensor.is_floating_point()
    )
    travelling = {a: n for a, n in aliases.items() if n in state}  # not non-persistent buffers
    groups: dict[str, str] = {}
    if shared_residual_mask:
        groups = {name: "residual" for name in unit_axes if RESIDUAL_READERS.search(name)}
        if not groups:
            raise ValueError(
                f"shared_residual_mask: {type(model).__name__} has no tensor that reads a "
                "transformer's residual stream (embeddings, query/key/value, MLP up projection)"
            )
    return MaskPolicy(
        unit_axes=unit_axes,
        unit_counts=unit_counts,
        quantized=quantized,
        tied=travelling,
        groups=groups,
    )


def num_hidden(num_units: int, ratio: float) -> int:
    """Units hidden out of ``num_units`` at ``ratio``; at least one stays visible."""
    return min(math.floor(ratio * num_units + 0.5), num_units - 1)


#: Where a mask's randomness comes from: a generator (the server's secret draws,
#: :func:`fedqsn_flwr.core.secret.secret_rng`) or a public integer seed (tests,
#: benchmarks: anyone can redo such a mask).
RandomSource = np.random.Generator | int


def _generator(source: RandomSource, purpose: str) -> np.random.Generator:
    if isinstance(source, np.random.Generator):
        return source
    if isinstance(source, bool) or not isinstance(source, int | np.integer):
        raise TypeError(f"a mask needs a numpy Generator or an int seed, got {type(source)}")
    return np.random.default_rng(derive_seed(purpose, int(source)))


def _keep(units: torch.Tensor, ratio: float, generator: np.random.Generator) -> torch.Tensor:
    hidden = num_hidden(units.numel(), ratio)
    order = torch.from_numpy(generator.permutation(units.numel()))
    return torch.sort(units[order[hidden:]]).values


def _draws(names: Iterable[str], groups: Mapping[str, str]) -> list[list[str]]:
    # one draw per group, in the order of the sorted draw keys; without groups
    # every tensor is its own key, which keeps the draws of ungrouped policies
    by_key: dict[str, list[str]] = {}
    for name in sorted(names):
        by_key.setdefault(groups.get(name, name), []).append(name)
    return [by_key[key] for key in sorted(by_key)]


def draw_server_mask(policy: MaskPolicy, ratio: float, rng: RandomSource) -> UnitMask:
    """Visible units per masked tensor after hiding ``ratio`` (p1) of them.

    ``rng``: a numpy ``Generator`` -- FedQSN passes one whose whole state comes
    from the server secret -- or a public integer seed. The tensors of one of
    the policy's ``groups`` get the same units.
    """
    generator = _generator(rng, "server-mask")
    mask: UnitMask = {}
    for members in _draws(policy.unit_counts, policy.groups):
        visible = _keep(torch.arange(policy.unit_counts[members[0]]), ratio, generator)
        mask |= dict.fromkeys(members, visible)
    return mask


def draw_client_mask(
    server_mask: UnitMask,
    ratio: float,
    rng: RandomSource,
    groups: Mapping[str, str] | None = None,
) -> UnitMask:
    """Units a client sees: ``ratio`` (p2) of the server-visible units hidden again.

    ``rng``: a numpy ``Generator`` (FedQSN: from the server secret, the round
    and the client, so every client gets a fresh mask no client can predict)
    or a public integer seed. ``groups``: the policy's mask groups, whose
    tensors keep sharing their units.
    """
    generator = _generator(rng, "client-mask")
    mask: UnitMask = {}
    for members in _draws(server_mask, groups or {}):
        visible = _keep(server_mask[members[0]], ratio, generator)
        mask |= dict.fromkeys(members, visible)
    return mask


def unit_scale(num_units: int, visible: torch.Tensor) -> float:
    """Inverted-dropout factor for a tensor whose ``visible`` units are kept."""
    return num_units / visible.numel()


def take_units(tensor: torch.Tensor, axis: int, visible: torch.Tensor) -> torch.Tensor:
    """The visible slices of ``tensor`` along ``axis`` (hidden ones are dropped)."""
    return tensor.index_select(axis, visible.to(tensor.device))


def apply_mask(
    state: Mapping[str, torch.Tensor], policy: MaskPolicy, mask: UnitMask
) -> dict[str, torch.Tensor]:
    """Dense copy of ``state`` with hidden units zeroed and visible ones rescaled.

    This is the model a mask defines (e.g. the paper's *server model* for the
    server mask); unmasked tensors are copied unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name not in policy.unit_axes:
            out[name] = tensor.clone()
            continue
        axis, visible = policy.unit_axes[name], mask[name]
        dense = torch.zeros_like(tensor)
        scale = unit_scale(policy.unit_counts[name], visible)
        dense.index_copy_(
            axis, visible.to(tensor.device), take_units(tensor, axis, visible) * scale
        )
        out[name] = dense
    return out
