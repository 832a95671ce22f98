"""Batch norm folded into the layer before it: the same outputs, the same bounds, fewer nodes."""
import pytest
import torch
import torch.nn as nn

from tests.verifiers.nets import OPERATIONS, cell_net, op_net
from verifiers.bounds import compute_bounds
from verifiers.fold import fold_batch_norm


def _relative(a, b):
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


@pytest.mark.parametrize("op", [o for o in OPERATIONS if "conv" in o] + ["mixed"])
def test_folded_network_has_the_same_outputs_and_bounds(op):
    net = op_net(op, 1, seed=3)
    folded = fold_batch_norm(net)
    assert folded.folded_batch_norms >= 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-6)
    for method in ("ibp", "crown"):
        ours, theirs = compute_bounds(folded, x, 0.02, method=method), compute_bounds(net, x, 0.02, method=method)
        assert _relative(ours[0], theirs[0]) < 1e-5 and _relative(ours[1], theirs[1]) < 1e-5


def test_folding_leaves_the_model_and_unfoldable_layers_alone():
    net = cell_net(seed=1)
    folded = fold_batch_norm(net)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-6)
    plain = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3))  # batch norm before the convolution: not folded
    assert fold_batch_norm(plain).folded_batch_norms == 0
    linear = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3)).eval()
    with torch.no_grad():
        linear[1].running_mean.uniform_(-1, 1), linear[1].running_var.uniform_(0.5, 2)
        z = torch.randn(5, 4)
        assert torch.allclose(fold_batch_norm(linear)(z), linear(z), atol=1e-6)
