"""The first client of a fresh process trains exactly like every later one."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import numpy as np, torch
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from fedqsn_flwr.app.client import handle_train
    from fedqsn_flwr.app.config import DEFAULTS, validate
    from fedqsn_flwr.core.masking import draw_client_mask, draw_server_mask, policy_for_model
    from fedqsn_flwr.app.models import build_model
    from fedqsn_flwr.flower.proxy import LAYOUT_RECORD, PROXY_RECORD, encode_proxy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    config = validate({**DEFAULTS, "local-epochs": 1, "seed": 7})
    torch.manual_seed(0)
    model = build_model("cnn")
    policy = policy_for_model(model)
    visible = draw_client_mask(draw_server_mask(policy, 0.5, 1), 0.2, 2)
    arrays, layout, _ = encode_proxy(
        model.state_dict(), policy, visible, bit_width=4, block_size=64, update_bit_width=32
    )
    context = Context(
        run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(), run_config={},
    )
    updates = []
    for _ in range(2):
        settings = ConfigRecord({"server-round": 1, "local-epochs": 1, "learning-rate": 0.05,
                                 "batch-size": 32, "partition-rows": list(range(0, 600, 2))})
        content = RecordDict({PROXY_RECORD: arrays, LAYOUT_RECORD: layout, "config": settings})
        message = Message(content, message_type=MessageType.TRAIN, dst_node_id=5)
        update = handle_train(message, context, config).content["update"]
        updates.append({k: update[k].numpy() for k in update.keys()})
    differ = [k for k in updates[0] if not np.array_equal(updates[0][k], updates[1][k])]
    print("DIFFER", differ)
    """
)


@pytest.mark.slow
def test_first_client_of_a_process_trains_like_the_next():
    """Found as a bug: the first decode starts numba's OpenMP threads and reset torch's.

    The first client of every process then trained on two threads (other float
    sums); only a fresh process shows it, hence the subprocess.
    """
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=root, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DIFFER []" in out.stdout, out.stdout[-2000:]
