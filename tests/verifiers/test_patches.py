"""Full CROWN in auto_LiRPA's patches mode (verifiers.lirpa patch 12), checked without trusting it:
patches mode equals matrix mode (the dense, slow representation, correct without the patch) on every
operation; sampled and PGD-searched points and the exact MILP minimum never leave its bounds; and the
unpatched backward really is wrong, so these tests can fail."""
import math

import pytest
import torch
import torch.nn as nn

from tests.verifiers.nets import OPERATIONS, op_net
from tests.violation import max_violation
from verifiers import lirpa
from verifiers.bounds import BoundMethod, compute_bounds, margin_lower_bound, margin_specification
from verifiers.milp import exact_margin

EPS = {math.inf: 0.05, 2.0: 0.4}


def _relative(a, b):
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


def _inputs(seed=1, batch=2, size=8):
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.02])
    return x


@pytest.mark.parametrize("norm,sparse", [(math.inf, True), (math.inf, False), (2.0, False)],
                         ids=["linf-sparse", "linf-dense", "l2"])  # (sparse is L-inf only)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op", list(OPERATIONS) + ["mixed"])
def test_patches_mode_crown_equals_matrix_mode_on_every_operation(op, stride, norm, sparse):
    net = op_net(op, stride, seed=stride)
    x = _inputs()
    patches = compute_bounds(net, x, EPS[norm], norm=norm, method="crown", conv_mode="patches", sparse=sparse)
    matrix = compute_bounds(net, x, EPS[norm], norm=norm, method="crown", conv_mode="matrix", sparse=sparse)
    assert _relative(patches[0], matrix[0]) < 1e-5 and _relative(patches[1], matrix[1]) < 1e-5


@pytest.mark.parametrize("method", ["crown", "dense crown", "alpha-crown"])
@pytest.mark.parametrize("op", ["sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "max_pool_3x3", "mixed"])
def test_patches_mode_bounds_contain_every_sampled_and_attacked_output(op, method):
    net = op_net(op, 1, seed=7)
    x = _inputs(seed=3)
    lower, upper = compute_bounds(net, x, EPS[math.inf], method=method.split()[-1], conv_mode="patches",
                                  sparse=not method.startswith("dense"))
    tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
    assert max_violation(net, x, EPS[math.inf], math.inf, lower.detach(), upper.detach(), samples=48,
                         pgd_steps=25) <= tolerance


def _grouped_dilated_net() -> nn.Sequential:
    """conv, ReLU, a depthwise dilated conv, ReLU, a grouped stride-2 conv, ReLU, linear: tiny enough for MILP."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


@pytest.mark.parametrize("seed", [0, 1])
def test_patches_mode_margin_never_exceeds_the_exact_milp_minimum(seed):
    torch.manual_seed(seed)
    net = _grouped_dilated_net().eval()
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = net(x).argmax(1)
    sparse = margin_lower_bound(net, x, y, 0.05, method="crown")
    spec = margin_specification(y, 3)
    dense = compute_bounds_with_spec(net, x, 0.05, spec)
    for i in range(len(x)):
        exact = exact_margin(net, x[i], int(y[i]), 0.05)
        assert exact.optimal, exact.message
        assert sparse[i].item() <= exact.margin + 1e-5 and dense[i].item() <= exact.margin + 1e-5


def compute_bounds_with_spec(net, x, eps, spec):
    """Dense CROWN margin bound (every intermediate neuron back-substituted) through the internal API."""
    from verifiers.bounds import _bound
    lower, _ = _bound(net, x, torch.full((len(x),), eps), math.inf, BoundMethod.CROWN, C=spec, bound_upper=False,
                      sparse=False)
    return lower.min(dim=1).values


def test_without_patch_12_a_depthwise_convolution_gets_bounds_that_sampled_points_violate(monkeypatch):
    """The bug the patch fixes, shown: the original backward gives a depthwise convolution wrong,
    violated patches-mode bounds; with the patch they equal matrix mode and hold."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                             nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3)).eval()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    matrix = compute_bounds(net(), x, 0.05, method="crown", conv_mode="matrix", sparse=False)
    patched = compute_bounds(net(), x, 0.05, method="crown", sparse=False)
    assert _relative(patched[0], matrix[0]) < 1e-5
    assert max_violation(net(), x, 0.05, math.inf, patched[0].detach(), patched[1].detach(), samples=32, pgd_steps=20) == 0
    monkeypatch.setattr(lirpa.BoundConv, "bound_backward", lirpa.BoundConv.bound_backward.__wrapped_original__)
    unpatched = compute_bounds(net(), x, 0.05, method="crown", sparse=False)  # a fresh model: no cached wrapper
    assert _relative(unpatched[0], matrix[0]) > 1e-2
    assert max_violation(net(), x, 0.05, math.inf, unpatched[0].detach(), unpatched[1].detach(), samples=32,
                         pgd_steps=20) > 1e-3


def test_dense_kernel_is_the_same_convolution():
    torch.manual_seed(0)
    for groups, dilation, stride, padding in [(4, 1, 1, 1), (4, 2, 1, 2), (2, 2, 2, 2), (1, 3, 1, 3)]:
        conv = nn.Conv2d(4, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False)
        x = torch.randn(2, 4, 9, 9)
        dense = lirpa.dense_kernel(conv.weight, groups, dilation)
        expected = conv(x)
        assert torch.allclose(nn.functional.conv2d(x, dense, stride=stride, padding=padding), expected, atol=1e-5)


def _brute_force_matrix(pieces, shape, stride, padding):
    """Place each output position's patch on the padded image by explicit loops, then crop."""
    left, right, top, bottom = padding
    step_h, step_w = stride
    out_c, batch, out_h, out_w, channels, kh, kw = pieces.shape
    full = torch.zeros(batch, out_c, out_h, out_w, channels, shape[0] + top + bottom, shape[1] + left + right)
    for i in range(out_h):
        for j in range(out_w):
            full[:, :, i, j, :, i * step_h:i * step_h + kh, j * step_w:j * step_w + kw] = pieces[:, :, i, j].transpose(0, 1)
    full = full[..., top:top + shape[0], left:left + shape[1]]
    return full.reshape(batch, out_c * out_h * out_w, channels, *shape)


@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), (1, 1), (1, 1, 1, 1)), ((1, 3), (1, 1), (1, 1, 0, 0)),
                                                   ((3, 1), (1, 1), (0, 0, 1, 1)), ((5, 3), (2, 1), (1, 1, 2, 2)),
                                                   ((3, 3), (2, 2), (0, 1, 0, 1))])
def test_patches_to_matrix_matches_a_direct_construction(kernel, stride, padding):
    shape = (7, 6)
    out_h = (shape[0] + padding[2] + padding[3] - kernel[0]) // stride[0] + 1
    out_w = (shape[1] + padding[0] + padding[1] - kernel[1]) // stride[1] + 1
    pieces = torch.randn(3, 2, out_h, out_w, 2, *kernel, generator=torch.Generator().manual_seed(0))
    expected = _brute_force_matrix(pieces, shape, stride, padding)
    for stride_form in (stride, (stride[1], stride[1], stride[0], stride[0])):  # (h, w) and auto_LiRPA's 4-tuple
        assert torch.equal(lirpa.patches_to_matrix(pieces, (2, *shape), stride_form, padding), expected)
    rows = torch.tensor([0, out_h - 1]), torch.tensor([0, out_w - 1])
    sparse = pieces[[1, 2], :, rows[0], rows[1]]  # (unstable, batch, c, kh, kw)
    picked = lirpa.patches_to_matrix(sparse, (2, *shape), stride, padding, (2, 3, out_h, out_w),
                                     (torch.tensor([1, 2]), rows[0], rows[1]))
    dense_rows = expected.view(2, 3, out_h, out_w, 2, *shape)[:, [1, 2], rows[0], rows[1]]
    assert torch.equal(picked, dense_rows)


def test_adding_patches_of_different_kernels_aligns_them_in_input_coordinates():
    """Two branches' coefficients on one 8x8 input at stride 2: a 1x1 window (covering pixel 2i) and a
    2x2 window (pixels 2i, 2i + 1). Their sum, as dense matrices, must be the sum of the two matrices."""
    g = torch.Generator().manual_seed(0)
    one = lirpa.Patches(torch.randn(3, 1, 4, 4, 2, 1, 1, generator=g), 2, 0, (3, 1, 4, 4, 2, 1, 1))
    two = lirpa.Patches(torch.randn(3, 1, 4, 4, 2, 2, 2, generator=g), 2, 0, (3, 1, 4, 4, 2, 2, 2))
    padded = lirpa.Patches(torch.randn(3, 1, 4, 4, 2, 3, 3, generator=g), 2, 1, (3, 1, 4, 4, 2, 3, 3))
    shape = (1, 2, 8, 8)
    dense = {name: lirpa.patches_to_matrix(p.patches, shape, p.stride, p.padding)
             for name, p in (("one", one), ("two", two), ("padded", padded))}
    for a, b in (("one", "two"), ("two", "one"), ("one", "padded"), ("padded", "two")):
        total = {"one": one, "two": two, "padded": padded}[a] + {"one": one, "two": two, "padded": padded}[b]
        merged = lirpa.patches_to_matrix(total.patches, shape, total.stride, total.padding)
        assert torch.allclose(merged, dense[a] + dense[b], atol=1e-6), (a, b)
