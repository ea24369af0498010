"""fedqsn-flwr: FedQSN (random masking + NormalFloat quantization) for Flower.

The strategy, in a ServerApp::

    from fedqsn_flwr import FedQSN, policy_for_model

    strategy = FedQSN(policy_for_model(model), server_mask_ratio=0.1, client_mask_ratio=0.1)

and in a ClientApp's ``@app.train`` handler::

    received = load_received(model, msg.content)
    with freeze_hidden(model, received):
        my_training_loop(model, data)
    return train_reply(msg, model, received, num_examples=len(data))

(``examples/own-app`` is a complete app). This top level imports only the
algorithm (:mod:`fedqsn_flwr.core`) and the Flower integration
(:mod:`fedqsn_flwr.flower`); this project's app and experiment tools live in
:mod:`fedqsn_flwr.app` and :mod:`fedqsn_flwr.experiments` (extras ``app``,
``experiments``).
"""

from fedqsn_flwr.core.aggregation import ClientUpdate, apply_updates
from fedqsn_flwr.core.masking import (
    MaskPolicy,
    apply_mask,
    draw_client_mask,
    draw_server_mask,
    format_description,
    policy_for_model,
    tied_state_once,
)
from fedqsn_flwr.core.quantization import (
    dequantize,
    dequantize_packed,
    normal_float_codebook,
    pack_bits,
    quantize,
    quantize_packed,
    unpack_bits,
)
from fedqsn_flwr.core.secret import init_from_secret, new_secret, torch_rng_from_secret
from fedqsn_flwr.flower.client_helpers import (
    FrozenHidden,
    freeze_hidden,
    load_received,
    train_reply,
)
from fedqsn_flwr.flower.protocol import (
    LAYOUT_RECORD,
    METRICS_RECORD,
    PROXY_RECORD,
    UPDATE_RECORD,
)
from fedqsn_flwr.flower.proxy import (
    InvalidUpdate,
    Proxy,
    decode_proxy,
    decode_update,
    encode_proxy,
    encode_update,
)
from fedqsn_flwr.flower.strategies import FedQSN, MeasuredFedAvg

__all__ = [
    "LAYOUT_RECORD",
    "METRICS_RECORD",
    "PROXY_RECORD",
    "UPDATE_RECORD",
    "ClientUpdate",
    "FedQSN",
    "FrozenHidden",
    "InvalidUpdate",
    "MaskPolicy",
    "MeasuredFedAvg",
    "Proxy",
    "apply_mask",
    "apply_updates",
    "decode_proxy",
    "decode_update",
    "dequantize",
    "dequantize_packed",
    "draw_client_mask",
    "draw_server_mask",
    "encode_proxy",
    "encode_update",
    "format_description",
    "freeze_hidden",
    "init_from_secret",
    "load_received",
    "new_secret",
    "normal_float_codebook",
    "pack_bits",
    "policy_for_model",
    "quantize",
    "quantize_packed",
    "tied_state_once",
    "torch_rng_from_secret",
    "train_reply",
    "unpack_bits",
]
