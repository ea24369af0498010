"""What a ClientApp needs to take part in FedQSN with its own model and training loop.

Three calls around any ``@app.train`` handler, and one in ``@app.evaluate``::

    received = load_received(model, msg.content)      # proxy or FedAvg's arrays
    with freeze_hidden(model, received):              # hidden entries stay zero
        my_training_loop(model, data)                 # any optimizer, any loop
    return train_reply(msg, model, received, num_examples=len(data))

    load_received(model, msg.content)                 # in @app.evaluate
    ...                                               # then reply as Flower does

The same handlers work with FedQSN, FedQ, FedSN and plain FedAvg: the message
says which it is. Record names come from :mod:`fedqsn_flwr.flower.protocol`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedqsn_flwr.flower.protocol import (
    FEEDBACK_RECORD,
    LAYOUT_RECORD,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    PROXY_RECORD,
    UPDATE_RECORD,
)
from fedqsn_flwr.flower.proxy import Proxy, decode_proxy, encode_update, received_model


def load_received(model: torch.nn.Module, content: RecordDict, arrays_key: str = "arrays") -> Proxy:
    """Load what a train or evaluate message carries into ``model``; return it.

    A FedQSN proxy is decoded straight into the model's tensors (hidden units
    become zeros; no second dense copy of the model is made); FedAvg's plain
    arrays (under ``arrays_key``) are loaded with ``load_state_dict``. Keep the
    returned :class:`~fedqsn_flwr.flower.proxy.Proxy` for :func:`freeze_hidden`
    and :func:`train_reply`.

    Raises
    ------
    KeyError
        The message holds neither a proxy nor ``arrays_key``.
    ValueError
        The proxy does not fit ``model`` (another architecture) or is malformed.

    """
    if PROXY_RECORD in content.array_records:
        return decode_proxy(content[PROXY_RECORD], content[LAYOUT_RECORD], into=model.state_dict())
    received = received_model(content, arrays_key)
    model.load_state_dict(received.state)
    return received


class FrozenHidden:
    """Gradient hooks that zero the hidden entries' gradients (see :func:`freeze_hidden`)."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Take the hooks off the model's parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FrozenHidden:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()


def freeze_hidden(model: torch.nn.Module, received: Proxy) -> FrozenHidden:
    """Keep the proxy's hidden entries at zero through any gradient-based training.

    Registers a hook on every masked parameter that zeroes the gradient at the
    hidden entries, so the client trains exactly the subnetwork it was given
    (with SGD, momentum, Adam or AdamW the hidden entries stay exactly zero:
    their gradients and optimizer moments are zero, and decoupled weight decay
    of a zero is zero). Use it as a context manager, or call ``remove()``. With
    FedAvg's plain arrays nothing is hidden and no hook is added.
    """
    params = dict(model.named_parameters())
    handles = []
    for name, mask in received.hidden_masks().items():
        if name not in params:
            continue  # a buffer: not trained
        param = params[name]
        keep = (~mask).to(device=param.device, dtype=param.dtype).contiguous()
        handles.append(param.register_hook(lambda grad, keep=keep: grad * keep))
    return FrozenHidden(handles)


def train_reply(
    message: Message,
    model: torch.nn.Module,
    received: Proxy,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    feedback: ArrayRecord | None = None,
    weight_key: str = NUM_EXAMPLES_KEY,
) -> Message:
    """The reply to a train message after training ``model`` on ``num_examples``.

    For a FedQSN proxy: the update of the visible units only, encoded as the
    server asked (``"update"``); for FedAvg: the trained arrays under the key
    they came in. ``metrics`` (numbers) are added to the reply's metrics next
    to ``num_examples`` under ``weight_key`` (the strategy's ``weighted_by_key``,
    ``"num-examples"`` by default), which weighs the reply in aggregation;
    ``feedback`` is a hidden-unit feedback record (this project's app only).
    """
    if received.arrays_key is None:
        content = RecordDict({UPDATE_RECORD: encode_update(model.state_dict(), received)})
    else:
        content = RecordDict({received.arrays_key: ArrayRecord(model.state_dict())})
    content[METRICS_RECORD] = MetricRecord({weight_key: num_examples, **(metrics or {})})
    if feedback is not None:
        content[FEEDBACK_RECORD] = feedback
    return Message(content, reply_to=message)
