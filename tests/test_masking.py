import pytest
import torch

from fedqsn_flwr.app.models import build_model
from fedqsn_flwr.core.masking import (
    MaskPolicy,
    apply_mask,
    draw_client_mask,
    draw_server_mask,
    num_hidden,
    policy_for_model,
)
from fedqsn_flwr.core.secret import derive_seed


def _policy():
    return policy_for_model(build_model("cnn"))


def test_default_policy_masks_hidden_units_only():
    policy = _policy()
    # conv1 sees raw pixels; fc2's outputs are logits (its input units are hidden features)
    assert dict(policy.unit_axes) == {"conv2.weight": 1, "fc1.weight": 1, "fc2.weight": 1}
    assert dict(policy.unit_counts) == {"conv2.weight": 32, "fc1.weight": 256, "fc2.weight": 128}
    assert "conv1.weight" in policy.quantized and "fc2.bias" in policy.quantized
    with_input = policy_for_model(build_model("cnn"), mask_input_layer=True)
    assert with_input.unit_axes["conv1.weight"] == 1


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.9])
def test_server_mask_hides_the_requested_share(ratio):
    policy = _policy()
    mask = draw_server_mask(policy, ratio, 3)
    for name, count in policy.unit_counts.items():
        visible = mask[name]
        assert visible.numel() == count - num_hidden(count, ratio)
        assert abs((1 - visible.numel() / count) - ratio) <= 0.5 / count + 1e-9
        assert torch.equal(visible, torch.sort(visible).values)
        assert len(set(visible.tolist())) == visible.numel()


def test_client_mask_is_inside_server_visible_set_and_fresh_per_client():
    policy = _policy()
    server = draw_server_mask(policy, 0.3, 1)
    masks = [
        draw_client_mask(server, 0.3, derive_seed("test", 1, 1, 1, client)) for client in range(5)
    ]
    for mask in masks:
        for name, units in mask.items():
            assert set(units.tolist()) <= set(server[name].tolist())
            expected = server[name].numel() - num_hidden(server[name].numel(), 0.3)
            assert units.numel() == expected
    assert any(not torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_masks_are_deterministic_for_a_seed():
    policy = _policy()
    a, b, c = (draw_server_mask(policy, 0.2, s) for s in (5, 5, 6))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    ca = draw_client_mask(a, 0.2, derive_seed("test", 5, 2, 1, 3))
    cb = draw_client_mask(b, 0.2, derive_seed("test", 5, 2, 1, 3))
    assert all(torch.equal(ca[n], cb[n]) for n in ca)


def test_at_least_one_unit_stays_visible():
    assert num_hidden(4, 0.99) == 3
    assert num_hidden(1, 0.5) == 0


def test_apply_mask_zeroes_hidden_units_and_rescales_visible_ones():
    weight = torch.arange(24, dtype=torch.float32).view(2, 4, 3) + 1
    policy = MaskPolicy(unit_axes={"w": 1}, unit_counts={"w": 4}, quantized=frozenset())
    mask = {"w": torch.tensor([0, 2, 3])}
    out = apply_mask({"w": weight, "b": torch.ones(2)}, policy, mask)["w"]
    assert torch.all(out[:, 1] == 0)
    assert torch.allclose(out[:, [0, 2, 3]], weight[:, [0, 2, 3]] * 4 / 3)


def test_derived_seeds_are_domain_separated_and_injective():
    seeds = {
        derive_seed("sampling", 5, 2, 1),
        derive_seed("client-training", 5, 2, 1),  # same keys, another purpose
        derive_seed("sampling", 5, 2, 1, 0),  # a trailing zero used to collide
        derive_seed("sampling", 5, 2),
        derive_seed("sampling", 2**32, 5),
        derive_seed("sampling", 0, 1 + 5 * 2**32),  # same 32-bit words, other split
    }
    assert len(seeds) == 6
    assert derive_seed("sampling", 5, 2, 1) == derive_seed("sampling", 5, 2, 1)
    assert all(0 <= s < 2**63 for s in seeds)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="0..2"):
            derive_seed("sampling", bad)


def test_a_negative_unit_axis_is_refused():
    with pytest.raises(ValueError, match="unit axes must be 0 or more"):
        MaskPolicy(unit_axes={"w": -1}, unit_counts={"w": 4})


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedqsn_flwr.core.masking import tied_state_once

    config = GPT2Config(vocab_size=64, n_layer=2, n_embd=16, n_head=2, n_positions=16)
    return tied_state_once(GPT2LMHeadModel(config))


def test_shared_residual_mask_hides_the_same_stream_dimensions_in_every_reader():
    model = _tiny_gpt2()
    policy = policy_for_model(model, shared_residual_mask=True)
    readers = {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        *(f"transformer.h.{i}.{t}.weight" for i in (0, 1) for t in ("attn.c_attn", "mlp.c_fc")),
    }
    assert set(policy.groups) == readers
    # the writers' inputs (head outputs, MLP hidden units) keep masks of their own
    assert "transformer.h.0.attn.c_proj.weight" in policy.unit_axes
    assert "transformer.h.0.attn.c_proj.weight" not in policy.groups
    server = draw_server_mask(policy, 0.5, 7)
    first = server["transformer.wte.weight"]
    assert first.numel() == 8
    assert all(torch.equal(server[name], first) for name in readers)
    assert not all(
        torch.equal(server[n], server["transformer.h.0.mlp.c_proj.weight"][: first.numel()])
        for n in ("transformer.h.0.attn.c_proj.weight", "transformer.h.1.attn.c_proj.weight")
    )
    client = draw_client_mask(server, 0.25, 9, policy.groups)
    shared = client["transformer.wte.weight"]
    assert set(shared.tolist()) < set(first.tolist())
    assert all(torch.equal(client[name], shared) for name in readers)
    # without groups the same server mask gives every reader a mask of its own
    alone = draw_client_mask(server, 0.25, 9)
    assert any(not torch.equal(alone[name], alone["transformer.wte.weight"]) for name in readers)


def test_policies_without_groups_draw_as_before():
    # groups must not change the draws of ungrouped policies (earlier results and
    # checkpoints' masks stay reproducible): one draw per tensor, in name order
    from fedqsn_flwr.core.masking import _generator, _keep

    plain = policy_for_model(_tiny_gpt2())
    assert dict(plain.groups) == {}
    generator = _generator(4, "server-mask")
    expected = {
        name: _keep(torch.arange(count), 0.3, generator)
        for name, count in sorted(plain.unit_counts.items())
    }
    drawn = draw_server_mask(plain, 0.3, 4)
    assert all(torch.equal(drawn[n], expected[n]) for n in expected)
    generator = _generator(5, "client-mask")
    expected = {n: _keep(u, 0.2, generator) for n, u in sorted(drawn.items())}
    client = draw_client_mask(drawn, 0.2, 5)
    assert all(torch.equal(client[n], expected[n]) for n in expected)


def test_mask_groups_are_checked():
    policy = _policy()
    with pytest.raises(ValueError, match="as many units"):
        MaskPolicy(
            policy.unit_axes,
            policy.unit_counts,
            groups={"conv2.weight": "g", "fc1.weight": "g"},
        )
    with pytest.raises(ValueError, match="not masked"):
        MaskPolicy(policy.unit_axes, policy.unit_counts, groups={"conv1.weight": "g"})
    with pytest.raises(ValueError, match="residual stream"):
        policy_for_model(build_model("cnn"), shared_residual_mask=True)
