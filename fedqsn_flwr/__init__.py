"""fedqsn-flwr: FedQSN (random masking + NormalFloat quantization) for Flower.

Use the strategy in your own Flower app::

    from fedqsn_flwr import FedQSN, policy_for_model

    strategy = FedQSN(policy_for_model(model), server_mask_ratio=0.1,
                      client_mask_ratio=0.1, bit_width=4, block_size=64, seed=0)

and, in your ClientApp, :func:`decode_proxy` the received proxy, train it and
reply with :func:`encode_update` (see ``fedqsn_flwr/app/client.py``).
"""

from fedqsn_flwr.app.models import InputSpec, build_model
from fedqsn_flwr.app.sources import DataKey, RawData
from fedqsn_flwr.core.aggregation import ClientUpdate, apply_updates
from fedqsn_flwr.core.masking import (
    MaskPolicy,
    apply_mask,
    draw_client_mask,
    draw_server_mask,
    policy_for_model,
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
from fedqsn_flwr.flower.strategies import (
    FedQSN,
    MeasuredFedAvg,
)

__all__ = [
    "LAYOUT_RECORD",
    "METRICS_RECORD",
    "PROXY_RECORD",
    "UPDATE_RECORD",
    "ClientUpdate",
    "DataKey",
    "FedQSN",
    "InputSpec",
    "InvalidUpdate",
    "MaskPolicy",
    "MeasuredFedAvg",
    "Proxy",
    "RawData",
    "apply_mask",
    "apply_updates",
    "build_model",
    "decode_proxy",
    "decode_update",
    "dequantize",
    "dequantize_packed",
    "draw_client_mask",
    "draw_server_mask",
    "encode_proxy",
    "encode_update",
    "normal_float_codebook",
    "pack_bits",
    "policy_for_model",
    "quantize",
    "quantize_packed",
    "unpack_bits",
]
