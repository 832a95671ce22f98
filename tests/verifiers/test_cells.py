"""Bounds on a cell-shaped network (one state feeding several operations, sums, concatenation, batch
norm in both modes) built without certnas: the interval engine equals auto_LiRPA, full CROWN in patches
mode equals matrix mode, and sampled and PGD-searched points never leave any bound."""
import math

import pytest
import torch

from tests.verifiers.nets import cell_net
from tests.violation import max_violation
from verifiers.bounds import compute_bounds, margin_lower_bounds
from verifiers.interval import interval_margins


def _relative(a, b):
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


def _inputs(seed=3, batch=3, size=12):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_interval_engine_equals_auto_lirpa_on_a_cell_network(training):
    net = cell_net(seed=1).train(training)
    x, y = _inputs()
    bounds = interval_margins(net, x, y, 0.01, crown_ibp=True)
    assert _relative(bounds.ibp, margin_lower_bounds(net, x, y, 0.01, method="ibp")) < 1e-5
    assert _relative(bounds.crown_ibp, margin_lower_bounds(net, x, y, 0.01, method="crown-ibp")) < 1e-5


@pytest.mark.parametrize("ops", [("sep_conv_3x3", "skip_connect", "dil_conv_3x3", "max_pool_3x3"),
                                 ("sep_conv_5x5", "avg_pool_native", "dil_conv_5x5", "max_pool_native")],
                         ids=["sound-layers", "native-pooling"])
def test_crown_in_patches_mode_equals_matrix_mode_and_holds_on_a_cell_network(ops):
    net = cell_net(seed=2, ops=ops)
    x, _ = _inputs(seed=2, batch=2)
    patches = compute_bounds(net, x, 0.003, method="crown")
    matrix = compute_bounds(net, x, 0.003, method="crown", conv_mode="matrix")
    assert _relative(patches[0], matrix[0]) < 1e-5 and _relative(patches[1], matrix[1]) < 1e-5
    crown_ibp = compute_bounds(net, x, 0.003, method="crown-ibp")
    assert (patches[0] >= crown_ibp[0] - 1e-4).all() and (patches[1] <= crown_ibp[1] + 1e-4).all()
    lower, upper = patches
    tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
    assert max_violation(net, x, 0.003, math.inf, lower.detach(), upper.detach(), samples=24, pgd_steps=15) <= tolerance


@pytest.mark.parametrize("engine", ["tape", "lirpa"])
@pytest.mark.parametrize("norm,eps", [(math.inf, 0.01), (2.0, 0.2)], ids=["linf", "l2"])
def test_alpha_crown_is_sound_and_never_looser_than_crown(norm, eps, engine):
    # alpha-CROWN optimises the output's alphas over fixed CROWN intermediate bounds (verifiers.lirpa
    # patch 17 on auto_LiRPA; verifiers.crown on the tape): it starts from CROWN's relaxation and keeps the
    # best bound, so it is never looser than CROWN on the same engine (the tape's adaptive back-substitution
    # may be looser than auto_LiRPA's, so engines are not mixed), and at a radius with many unstable ReLUs
    # the optimisation must tighten some margin.
    net = cell_net(seed=4).eval()
    x, y = _inputs(seed=5, batch=3)
    crown = margin_lower_bounds(net, x, y, eps, norm=norm, method="crown", engine=engine)
    alpha = margin_lower_bounds(net, x, y, eps, norm=norm, method="alpha-crown", engine=engine)
    assert (alpha >= crown - 1e-5 * (1 + crown.abs().max())).all()
    assert (alpha > crown + 1e-4).any(), (alpha, crown)
    lower, upper = compute_bounds(net, x, eps, norm=norm, method="alpha-crown", engine=engine)
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
    tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
    assert max_violation(net, x, eps, norm, lower, upper, samples=32, pgd_steps=20) <= tolerance


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_concatenation_feeding_a_relu_starts_its_crown_bound_in_patches(monkeypatch, sparse):
    """verifiers.lirpa patch 19: the identity a concatenation's intermediate bound starts from is patches,
    not a dense neurons x neurons matrix (which needed more than 23 GB on a 3-cell network at 28x28). The
    bounds it gives are checked against matrix mode and sampled points above."""
    from auto_LiRPA.operators.shape import BoundConcat
    from verifiers import lirpa
    patched = lirpa.BoundedModule.get_sparse_C
    starts = []

    def spy(self, node, *args, **kwargs):
        result = patched(self, node, *args, **kwargs)
        if isinstance(node, BoundConcat):
            starts.append(type(result[0]).__name__)
        return result

    monkeypatch.setattr(lirpa.BoundedModule, "get_sparse_C", spy)
    x, _ = _inputs(seed=2, batch=2)
    net = cell_net(seed=2)
    patches = compute_bounds(net, x, 0.05, method="crown", sparse=sparse)
    assert starts and set(starts) <= {"Patches", "NoneType"}, starts
    matrix = compute_bounds(net, x, 0.05, method="crown", conv_mode="matrix", sparse=sparse)
    assert _relative(patches[0], matrix[0]) < 1e-5 and _relative(patches[1], matrix[1]) < 1e-5


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_chunked_crown_rows_give_the_same_bounds(monkeypatch, sparse):
    """verifiers.lirpa patch 20: back-substituting an intermediate node's neurons a few rows at a time
    (7 here, so every node of the cell network is split, full and sparse identities alike) gives the
    bounds of one pass over all of them."""
    from verifiers import bounds
    x, _ = _inputs(seed=4, batch=2)
    net = cell_net(seed=3)
    monkeypatch.setattr(bounds, "MAX_CROWN_ROWS", 0)  # 0: no limit
    whole = compute_bounds(net, x, 0.02, method="crown", sparse=sparse)
    monkeypatch.setattr(bounds, "MAX_CROWN_ROWS", 7)
    chunked = compute_bounds(net, x, 0.02, method="crown", sparse=sparse)
    assert _relative(chunked[0], whole[0]) < 1e-5 and _relative(chunked[1], whole[1]) < 1e-5
