import torch

from fedqsn_flwr.core.aggregation import ClientUpdate, apply_updates
from fedqsn_flwr.core.masking import MaskPolicy


def test_two_clients_by_hand():
    """W is 2x3 with units on axis 1 (columns); b is an unmasked bias.

    Client A (30 examples) saw columns {0, 1}; client B (10 examples) saw {1, 2}.
    Column 0: only A -> +dA; column 1: (30 dA + 10 dB) / 40; column 2: only B.
    """
    policy = MaskPolicy(unit_axes={"w": 1}, unit_counts={"w": 3}, quantized=frozenset())
    state = {"w": torch.zeros(2, 3), "b": torch.tensor([1.0, 1.0])}
    a = ClientUpdate(
        deltas={"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([4.0, 0.0])},
        visible={"w": torch.tensor([0, 1])},
        weight=30,
    )
    b = ClientUpdate(
        deltas={"w": torch.tensor([[10.0, 20.0], [30.0, 40.0]]), "b": torch.tensor([0.0, 8.0])},
        visible={"w": torch.tensor([1, 2])},
        weight=10,
    )
    out = apply_updates(state, [a, b], policy)
    expected_w = torch.tensor(
        [[1.0, (30 * 2 + 10 * 10) / 40, 20.0], [3.0, (30 * 4 + 10 * 30) / 40, 40.0]]
    )
    assert torch.allclose(out["w"], expected_w)
    assert torch.allclose(out["b"], torch.tensor([1 + 3.0, 1 + 2.0]))
    assert torch.equal(state["w"], torch.zeros(2, 3))  # input not modified


def test_units_nobody_saw_keep_their_value():
    policy = MaskPolicy(unit_axes={"w": 0}, unit_counts={"w": 3}, quantized=frozenset())
    state = {"w": torch.tensor([5.0, 6.0, 7.0])}
    update = ClientUpdate(
        deltas={"w": torch.tensor([1.0])}, visible={"w": torch.tensor([1])}, weight=1
    )
    out = apply_updates(state, [update], policy)
    assert out["w"].tolist() == [5.0, 7.0, 7.0]
