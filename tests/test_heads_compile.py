"""The stacked step's forward and loss trace as ONE graph, what torch.compile and CUDA-graph capture need.

Compile itself is not used: on the CPU it measured no faster than eager for a 2-A group and 1.5x slower for a
1-B group, with a recompile per stack shape (benchmarks/results/step_profile.md). These tests only keep the
forward capturable, with the "aot_eager" backend (dynamo + AOTAutograd, no C++ compiler): a graph break (e.g.
numpy offsets used as slice bounds, which dynamo turns into data-dependent tensor reads) fails them. Not with
fullgraph=True: that traces such reads as unbacked symbols instead of breaking, so it would not fail; the test
counts the graphs of a plain torch.compile, the way the step would be compiled.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from heads.groups import GroupHead
from heads.models import HeadConfig

pytestmark = pytest.mark.usefixtures("one_thread")

C = 4


def loss_per_head(model, params, xs, masks, y):
    """The trainer's loss, as heads/train.py computes it without class weights: (G,)."""
    logits = model.forward(params, xs, masks)                                 # (G, B, C)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(logits.shape[0], -1).mean(1)


def group(strategy, fusions, dims, seeds=(0, 1)):
    configs = [HeadConfig(strategy, f, dims, C, middle_dim=20, fusion_dim=10) for f in fusions for _ in seeds]
    model = GroupHead(configs)
    params = model.init_params([torch.Generator().manual_seed(i) for i in range(len(configs))])
    return model, {k: v.requires_grad_() for k, v in params.items()}


@pytest.mark.parametrize("strategy,fusions,dims", [
    ("2A", ("add", "average", "product"), (16, 12)),   # a group of three operators: segments of the stack
    ("2B", ("gated",), (16, 12)),
    ("1A", ("concat",), (8, 8)),
])
def test_forward_and_loss_capture_as_one_graph_with_eager_gradients(strategy, fusions, dims):
    torch._dynamo.reset()
    model, params = group(strategy, fusions, dims)
    G, B = len(model.configs), 6
    rng = np.random.default_rng(0)
    xs = [torch.as_tensor(rng.normal(size=(G, B, d)), dtype=torch.float32) for d in dims]   # (G, B, D_m)
    y = torch.as_tensor(rng.integers(0, C, size=(G, B)))                                       # (G, B)
    masks = (torch.rand(G, B, model.dropout_width, generator=torch.Generator().manual_seed(1)) >= 0.3) / 0.7

    eager = loss_per_head(model, params, xs, masks, y)
    grads_eager = torch.autograd.grad(eager.sum(), list(params.values()))
    from torch._dynamo.testing import CompileCounterWithBackend   # here: importing dynamo costs ~2 s of CPU, and
    # every test worker collects this file, while one of them runs these tests

    counter = CompileCounterWithBackend("aot_eager")
    captured = torch.compile(loss_per_head, backend=counter)(model, params, xs, masks, y)
    grads_captured = torch.autograd.grad(captured.sum(), list(params.values()))

    assert counter.frame_count == 1, f"the step split into {counter.frame_count} graphs (graph breaks)"

    # the same ops, decomposed by AOTAutograd: equal up to float32 rounding, not necessarily to the bit
    torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(params, grads_captured, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
