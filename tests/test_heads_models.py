"""Head architectures: every strategy x every registered operator builds, runs and counts its parameters."""
import pytest
import torch

from heads.fusion import list_fusions
from heads.models import HeadConfig, StackedHead


pytestmark = pytest.mark.usefixtures("one_thread")


C, DI, DT, M, F = 5, 12, 8, 10, 6


def config(strategy, fusion):
    dims = {"1A": (M, M), "1B": (C, C), "2A": (DI, DT), "2B": (DI, DT), "image": (DI,), "text": (DT,)}[strategy]
    return HeadConfig(strategy, fusion, dims, C, middle_dim=M, fusion_dim=F)


CONFIGS = [config(s, f) for s in ("1A", "1B", "2A", "2B") for f in list_fusions()] + \
          [config("image", None), config("text", None)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.cell)
def test_forward_shapes_no_nans(cfg):
    model = StackedHead(cfg)
    G, B = 3, 7
    params = model.init_params([torch.Generator().manual_seed(i) for i in range(G)])
    assert all(v.shape[0] == G for v in params.values())
    inputs = [torch.randn(G, B, d) for d in cfg.input_dims]
    masks = (torch.rand(G, B, model.dropout_width) > cfg.dropout).float() / (1 - cfg.dropout)
    for m in (masks, None):
        out = model.forward(params, inputs, m)
        assert out.shape == (G, B, C) and torch.isfinite(out).all()


def linear(i, o):
    return i * o + o


@pytest.mark.parametrize("strategy,fusion,expected", [
    ("1A", "add", linear(M, F) + linear(F, C)),
    ("1A", "concat", linear(2 * M, F) + linear(F, C)),
    ("1A", "gated", linear(2 * M, M) + linear(M, F) + linear(F, C)),
    ("1B", "product", linear(C, F) + linear(F, C)),
    ("2A", "average", linear(DI, M) + linear(DT, M) + linear(M, F) + linear(F, C)),
    ("2B", "concat", linear(DI, M) + linear(DT, M) + 2 * linear(M, C) + linear(2 * C, F) + linear(F, C)),
    ("image", None, linear(DI, M) + linear(M, F) + linear(F, C)),
    ("text", None, linear(DT, M) + linear(M, F) + linear(F, C)),
])
def test_trainable_parameter_counts(strategy, fusion, expected):
    assert StackedHead(config(strategy, fusion)).num_parameters() == expected


def test_a_head_in_a_stack_gets_the_same_init_as_alone():
    cfg = config("2A", "gated")
    alone = StackedHead(cfg).init_params([torch.Generator().manual_seed(7)])
    stack = StackedHead(cfg).init_params([torch.Generator().manual_seed(s) for s in (3, 7, 9)])
    for k in alone:
        assert torch.equal(alone[k][0], stack[k][1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(strategy="3A", fusion="add", input_dims=(4, 4)), "unknown strategy"),
    (dict(strategy="2A", fusion="attention", input_dims=(4, 4)), "registered: add"),
    (dict(strategy="image", fusion="add", input_dims=(4,)), "takes no fusion"),
    (dict(strategy="1A", fusion="add", input_dims=(4, 5)), "sizes must match"),
    (dict(strategy="2A", fusion="add", input_dims=(4,)), "needs 2 input dims"),
])
def test_bad_configs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HeadConfig(num_classes=C, **kwargs)


def test_config_round_trips_through_a_dict():
    cfg = config("2B", "gated")
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg
