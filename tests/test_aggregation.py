import math

import pytest
import torch

from fedqsn_flwr.core import kernels
from fedqsn_flwr.core.aggregation import (
    ClientUpdate,
    _kernel_ready,
    apply_updates,
    sum_of_squares,
    sums_of_squares,
)
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


def _updates(shape, axis, dtype, num_clients, generator, weights):
    """Random updates of a tensor of ``shape`` (units along ``axis``; -1: unmasked)."""
    updates = []
    for client in range(num_clients):
        slice_shape = list(shape)
        visible = {}
        divisors = {}
        if axis >= 0:
            count = shape[axis]
            units = torch.sort(torch.randperm(count, generator=generator)[: max(1, count - 2)])
            visible["w"] = units.values
            slice_shape[axis] = units.values.numel()
            divisors["w"] = count / units.values.numel()
        delta = torch.randn(slice_shape, generator=generator) * 10 ** (client % 3 - 1)
        updates.append(ClientUpdate({"w": delta.to(dtype)}, visible, weights[client], divisors))
    return updates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape, axis",
    [
        ((64, 300), 1),
        ((300, 400), 1),  # enough values for the kernel's threads
        ((5, 7, 3, 3), 1),
        ((3, 1000, 20), 1),  # rows split into pieces of 8 entries per unit
        ((2, 9000, 3), 1),  # pieces of one entry per unit
        ((40, 9), 0),
        ((33, 20), -1),
        ((2, 40000), -1),
        ((17,), -1),
        ((), -1),
    ],
)
def test_the_kernel_aggregates_bit_for_bit_as_the_tensor_code(dtype, shape, axis):
    generator = torch.Generator().manual_seed(5)
    policy = MaskPolicy(
        unit_axes={"w": axis} if axis >= 0 else {},
        unit_counts={"w": shape[axis]} if axis >= 0 else {},
    )
    state = {"w": torch.randn(shape, generator=generator), "n": torch.tensor(3)}
    # integer and fractional weights, a zero weight, a subnormal one
    weights = [30, 7.5, 0.0, 1e-310, 1234567.0]
    updates = _updates(shape, axis, dtype, len(weights), generator, weights)
    assert _kernel_ready(state["w"], [u.deltas["w"] for u in updates]) == kernels.AVAILABLE
    fast = apply_updates(state, updates, policy)
    reference = apply_updates(state, updates, policy, backend="torch")
    assert torch.equal(fast["w"], reference["w"])
    assert torch.equal(fast["n"], state["n"])
    # the same with the deltas already in global units, as decode_update returns them
    divided = [ClientUpdate({"w": u.in_global_units("w")}, u.visible, u.weight) for u in updates]
    assert torch.equal(apply_updates(state, divided, policy)["w"], reference["w"])


def test_the_kernel_overflows_to_inf_as_the_tensor_code():
    policy = MaskPolicy(unit_axes={}, unit_counts={})
    state = {"w": torch.full((300, 300), 3e38)}
    update = ClientUpdate({"w": torch.full((300, 300), 3e38)}, {}, 1.0)
    fast = apply_updates(state, [update], policy)["w"]
    assert torch.equal(fast, apply_updates(state, [update], policy, backend="torch")["w"])
    assert torch.isinf(fast).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sum_of_squares_divides_in_float32_and_flags_nan_and_inf(dtype):
    generator = torch.Generator().manual_seed(2)
    values = (torch.randn(300, 500, generator=generator) * 3).to(dtype)
    expected = float((values.to(torch.float32) / 1.3).double().pow(2).sum())
    assert sum_of_squares(values, 1.3) == pytest.approx(expected, rel=1e-12)
    assert sum_of_squares(values[:3, :5].contiguous()) == pytest.approx(
        float(values[:3, :5].double().pow(2).sum()), rel=1e-12
    )
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = values.clone()
        spoiled[123, 45] = bad
        assert not math.isfinite(sum_of_squares(spoiled, 1.3))


def test_float64_norms_keep_their_precision():
    # 1e100 is inf in float32: an infinite norm bound would let every update through
    big = torch.tensor([1e100, 1.0], dtype=torch.float64)
    assert sums_of_squares([big], [1.0])[0] == pytest.approx(1e200)
