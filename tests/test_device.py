"""Compact uplink in a federation, and the CUDA path (run only where CUDA exists)."""

import pytest
import torch
from flwr.app import ArrayRecord

from fedqsn_flwr.app.config import validate
from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.app.server import train_config
from fedqsn_flwr.core.masking import policy_for_model
from fedqsn_flwr.flower.strategies import FedQSN
from tests.helpers import TEST_SECRET, LocalGrid, run_local


def test_compact_uplink_cuts_bytes_and_still_moves_the_model(base_config):
    wide, start, wide_final = run_local(base_config, 1, **{"update-bit-width": 32})
    narrow, _, narrow_final = run_local(base_config, 1, **{"update-bit-width": 4})
    ratio = narrow.round_log[1]["bytes_up"] / wide.round_log[1]["bytes_up"]
    assert ratio < 0.2, ratio
    name = "fc1.weight"
    step = (wide_final[name] - start[name]).norm()
    gap = (narrow_final[name] - wide_final[name]).norm()
    assert step > 0 and gap < 0.5 * step, (float(step), float(gap))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_strategy_sends_the_same_proxies_and_aggregates_alike(base_config):
    config = validate({**base_config, "fraction-evaluate": 0.0, "min-nodes": 3})
    torch.manual_seed(0)
    model = build_model("cnn")
    runs = []
    for device in ("cpu", "cuda"):
        strategy = FedQSN(
            policy_for_model(model),
            server_mask_ratio=0.2,
            client_mask_ratio=0.2,
            bit_width=4,
            block_size=64,
            seed=3,
            server_secret=TEST_SECRET,
            device=device,
            fraction_evaluate=0.0,
            min_train_nodes=3,
            min_available_nodes=3,
        )
        grid = LocalGrid(3, {**config, "device": device})
        result = strategy.start(
            grid, ArrayRecord(model.state_dict()), num_rounds=1, train_config=train_config(config)
        )
        runs.append((grid.sent, result.arrays.to_torch_state_dict()))
    (cpu_sent, cpu_final), (cuda_sent, cuda_final) = runs
    for a, b in zip(cpu_sent, cuda_sent, strict=True):
        if "proxy" in a.content.array_records:
            for key in a.content["proxy"].keys():
                assert a.content["proxy"][key].data == b.content["proxy"][key].data, key
    for name, tensor in cpu_final.items():
        assert torch.allclose(tensor, cuda_final[name], atol=1e-3), name
