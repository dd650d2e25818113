"""StackedHead against a plain torch.nn model (nn.Linear layers, the operators written out again) loaded with
the same weights: the same logits and the same gradients, for every strategy and operator, with and without
dropout masks, for each head of a stack."""
import pytest
import torch
from torch import nn

from heads.fusion import list_fusions
from heads.models import HeadConfig, StackedHead
from heads.strategies import get_strategy


pytestmark = pytest.mark.usefixtures("one_thread")

C, DI, DT, M, F = 5, 12, 8, 10, 6


def config(strategy, fusion):
    dims = {"1A": (M, M), "1B": (C, C), "2A": (DI, DT), "2B": (DI, DT), "image": (DI,), "text": (DT,)}[strategy]
    return HeadConfig(strategy, fusion, dims, C, middle_dim=M, fusion_dim=F)


class Reference(nn.Module):
    """DESIGN.md's heads as every PyTorch user writes them: per-modality Linear -> ReLU -> Dropout
    (-> Linear to C for 2-B), the operator, then Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, c: HeadConfig):
        super().__init__()
        self.c, self.modalities = c, get_strategy(c.strategy).modalities
        self.branched = c.strategy in ("2A", "2B", "image", "text")
        if self.branched:
            self.middle = nn.ModuleList(nn.Linear(d, c.middle_dim) for d in c.input_dims)
            if c.strategy == "2B":
                self.branch_classifier = nn.ModuleList(nn.Linear(c.middle_dim, c.num_classes) for _ in c.input_dims)
        d = c.input_dims[0] if not self.branched else c.num_classes if c.strategy == "2B" else c.middle_dim
        if c.fusion == "gated":
            self.gate = nn.Linear(2 * d, d)
        fused = 2 * d if c.fusion == "concat" else d
        self.fusion_layer = nn.Linear(fused, c.fusion_dim)
        self.classifier = nn.Linear(c.fusion_dim, c.num_classes)

    def fuse(self, a, b):
        f = self.c.fusion
        if f == "add":
            return a + b
        if f == "average":
            return (a + b) / 2
        if f == "product":
            return a * b
        if f == "concat":
            return torch.cat([a, b], dim=1)
        z = torch.sigmoid(self.gate(torch.cat([a, b], dim=1)))
        return z * a + (1 - z) * b

    def forward(self, xs, masks=None):
        """masks: one (B, width) scaled keep-mask per dropout layer (branches, then the fusion layer)."""
        masks = list(masks) if masks is not None else None

        def dropout(h):
            return h if masks is None else h * masks.pop(0)

        feats = list(xs)
        if self.branched:
            for i in range(len(feats)):
                h = dropout(torch.relu(self.middle[i](feats[i])))
                feats[i] = self.branch_classifier[i](h) if self.c.strategy == "2B" else h
        fused = feats[0] if self.c.fusion is None else self.fuse(*feats)
        return self.classifier(dropout(torch.relu(self.fusion_layer(fused))))


def load_into(reference: Reference, params: dict, g: int) -> None:
    """Head g of the stack into the reference; stacked linear weights are (in, out), nn.Linear's (out, in)."""
    def put(linear, prefix):
        linear.weight.data.copy_(params[f"{prefix}.weight"][g].T)
        linear.bias.data.copy_(params[f"{prefix}.bias"][g])

    for i, m in enumerate(reference.modalities):
        if reference.branched:
            put(reference.middle[i], f"{m}_middle")
            if reference.c.strategy == "2B":
                put(reference.branch_classifier[i], f"{m}_classifier")
    if reference.c.fusion == "gated":
        put(reference.gate, "fusion")
    put(reference.fusion_layer, "fusion_layer")
    put(reference.classifier, "classifier")


CONFIGS = [config(s, f) for s in ("1A", "1B", "2A", "2B") for f in list_fusions()] + \
          [config("image", None), config("text", None)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.cell)
@pytest.mark.parametrize("with_dropout", [False, True], ids=["eval", "dropout"])
def test_stacked_head_equals_a_plain_torch_model(cfg, with_dropout):
    torch.manual_seed(0)
    model, G, B = StackedHead(cfg), 3, 7
    params = {k: v.double().requires_grad_() for k, v in
              model.init_params([torch.Generator().manual_seed(i) for i in range(G)]).items()}
    xs = [torch.randn(B, d, dtype=torch.float64) for d in cfg.input_dims]
    masks = None
    if with_dropout:  # (G, B, W) keep-masks scaled by 1/(1-p), as the trainer draws them
        masks = (torch.rand(G, B, model.dropout_width) >= cfg.dropout).double() / (1 - cfg.dropout)
    logits = model.forward(params, [x.unsqueeze(0).expand(G, -1, -1) for x in xs], masks)  # (G, B, C)
    (logits ** 2).sum().backward()
    widths = [cfg.middle_dim] * (len(cfg.input_dims) if cfg.strategy in ("2A", "2B", "image", "text") else 0) \
        + [cfg.fusion_dim]
    assert sum(widths) == model.dropout_width
    for g in range(G):
        reference = Reference(cfg).double()
        load_into(reference, {k: v.detach() for k, v in params.items()}, g)
        head_masks = None if masks is None else torch.split(masks[g], widths, dim=1)
        expected = reference(xs, head_masks)  # (B, C)
        torch.testing.assert_close(logits[g], expected, rtol=1e-12, atol=1e-12)
        (expected ** 2).sum().backward()
        named = {"fusion_layer": reference.fusion_layer, "classifier": reference.classifier}
        if cfg.fusion == "gated":
            named["fusion"] = reference.gate
        for i, m in enumerate(reference.modalities):
            if reference.branched:
                named[f"{m}_middle"] = reference.middle[i]
        for prefix, linear in named.items():  # each head's gradient is its own model's gradient
            torch.testing.assert_close(params[f"{prefix}.weight"].grad[g], linear.weight.grad.T)
            torch.testing.assert_close(params[f"{prefix}.bias"].grad[g], linear.bias.grad)
