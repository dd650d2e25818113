"""Fusion operators: every registered one, shapes, gradients to both inputs, the gate's limits."""
import pytest
import torch

from heads.fusion import Fusion, create_fusion, list_fusions, register_fusion


pytestmark = pytest.mark.usefixtures("one_thread")


G, B, D = 2, 5, 6


def params_for(op, generator):
    return {k: torch.stack([op.init_param(k, s, generator) for _ in range(G)]) for k, s in op.param_shapes().items()}


def test_the_five_operators_are_registered():
    assert set(list_fusions()) >= {"add", "average", "product", "concat", "gated"}


@pytest.mark.parametrize("name", list_fusions())
def test_output_shape_and_gradient_to_both_inputs(name):
    op = create_fusion(name, D)
    a = torch.randn(G, B, D, requires_grad=True)
    b = torch.randn(G, B, D, requires_grad=True)
    out = op.forward(params_for(op, torch.Generator().manual_seed(0)), a, b)
    assert out.shape == (G, B, op.output_dim)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_output_dims():
    assert create_fusion("concat", D).output_dim == 2 * D
    for name in ("add", "average", "product", "gated"):
        assert create_fusion(name, D).output_dim == D


def test_fixed_operators_match_their_formulas():
    a, b = torch.randn(G, B, D), torch.randn(G, B, D)
    torch.testing.assert_close(create_fusion("add", D).forward({}, a, b), a + b)
    torch.testing.assert_close(create_fusion("average", D).forward({}, a, b), (a + b) / 2)
    torch.testing.assert_close(create_fusion("product", D).forward({}, a, b), a * b)
    torch.testing.assert_close(create_fusion("concat", D).forward({}, a, b), torch.cat([a, b], -1))


@pytest.mark.parametrize("bias,keeps", [(50.0, "image"), (-50.0, "text")])
def test_gate_saturating_keeps_one_modality(bias, keeps):
    op = create_fusion("gated", D)
    a, b = torch.randn(G, B, D), torch.randn(G, B, D)
    params = {"weight": torch.zeros(G, 2 * D, D) + 0.01, "bias": torch.full((G, D), bias)}
    out = op.forward(params, a, b)
    torch.testing.assert_close(out, a if keeps == "image" else b)


def test_unknown_operator_lists_the_registered_ones():
    with pytest.raises(ValueError, match="registered: add, average, product, concat, gated"):
        create_fusion("attention", D)


def test_a_new_operator_is_one_small_class():
    @register_fusion("test-max")
    class MaxFusion(Fusion):
        def forward(self, params, a, b):
            return torch.maximum(a, b)

    try:
        assert "test-max" in list_fusions()
        assert create_fusion("test-max", D).forward({}, torch.zeros(1, 1, D), torch.ones(1, 1, D)).sum() == D
    finally:
        from heads import fusion
        del fusion._FUSIONS["test-max"]   # private: the registry has no public way to unregister an operator
