"""A user's own torch model and ClientApp code, using only the public library API."""

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedqsn_flwr import (
    LAYOUT_RECORD,
    METRICS_RECORD,
    PROXY_RECORD,
    UPDATE_RECORD,
    FedQSN,
    decode_proxy,
    encode_update,
    freeze_hidden,
    policy_for_model,
)
from fedqsn_flwr.app.splits import load_server_data
from fedqsn_flwr.app.training import evaluate, train
from tests.helpers import TEST_SECRET, LocalGrid


class UserNet(nn.Module):
    """Not one of the project's models: LayerNorm, a Sequential, odd widths."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 48),
            nn.LayerNorm(48),
            nn.ReLU(),
            nn.Linear(48, 24),
            nn.ReLU(),
            nn.Linear(24, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def user_train(message: Message, context, config) -> Message:
    """What a user writes in their ClientApp's @app.train()."""
    partition = int(context.node_config["partition-id"])
    pool = load_server_data(
        "digits", seed=0, test_fraction=0.2, pretrain_fraction=0.1, secret=TEST_SECRET
    ).pool
    data = pool.subset(torch.arange(partition, len(pool), 3).numpy())
    model = UserNet()
    proxy = decode_proxy(
        message.content[PROXY_RECORD], message.content[LAYOUT_RECORD], into=model.state_dict()
    )
    with freeze_hidden(model, proxy):
        train(model, data, epochs=3, learning_rate=0.05, batch_size=32, seed=partition)
    metrics = MetricRecord({"num-examples": len(data)})
    return Message(
        RecordDict(
            {UPDATE_RECORD: encode_update(model.state_dict(), proxy), METRICS_RECORD: metrics}
        ),
        reply_to=message,
    )


def test_fedqsn_trains_a_users_own_model(base_config):
    torch.manual_seed(0)
    model = UserNet()
    policy = policy_for_model(model)
    assert set(policy.unit_axes) == {"body.4.weight", "body.6.weight"}
    assert "body.2.weight" in policy.quantized  # LayerNorm: quantized, not masked
    strategy = FedQSN(
        policy,
        server_mask_ratio=0.2,
        client_mask_ratio=0.2,
        bit_width=4,
        block_size=32,
        seed=1,
        server_secret=TEST_SECRET,
        fraction_evaluate=0.0,
        min_train_nodes=3,
        min_available_nodes=3,
    )
    start = {k: v.clone() for k, v in model.state_dict().items()}
    grid = LocalGrid(3, base_config, train_handler=user_train)
    result = strategy.start(grid, ArrayRecord(start), num_rounds=3)
    test = load_server_data(
        "digits", seed=0, test_fraction=0.2, pretrain_fraction=0.1, secret=TEST_SECRET
    ).test
    model.load_state_dict(start)
    before = evaluate(model, test)[1]
    model.load_state_dict(result.arrays.to_torch_state_dict())
    after = evaluate(model, test)[1]
    assert before < 0.3 and after > 0.6
