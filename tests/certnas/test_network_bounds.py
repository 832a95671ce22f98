"""Bounds on certnas' own networks (DARTS cells from named genotypes), checked without trusting the bound
code: auto_LiRPA against the interval engine, sampled and PGD-searched points, patches == matrix mode.
(The library's own tests, in tests/verifiers, build their networks without certnas.)"""
import math

import pytest
import torch
import torch.nn as nn

from certnas.data import INFO
from certnas.space.genotype import NAMED
from certnas.space.network import NetworkConfig, build_network
from tests.nets import randomise_batch_norm
from tests.violation import max_violation
from verifiers.bounds import compute_bounds, margin_lower_bounds
from verifiers.interval import interval_logit_bounds, interval_margins

EPS = 0.08


def _relative(a, b):
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


def _darts(genotype: str, layers: int = 3, channels: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    info = INFO["mnist-embedded"]
    config = NetworkConfig(kind="darts", in_channels=1, image_size=28, num_classes=10, mean=info.mean, std=info.std,
                           genotype=NAMED[genotype].to_dict(), layers=layers, init_channels=channels)
    net = build_network(config)
    with torch.no_grad():
        randomise_batch_norm(net, torch.Generator().manual_seed(seed))
    return net




@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("genotype", ["PC_DARTS"])
def test_darts_networks_match_auto_lirpa_in_both_batch_norm_modes(genotype, training):
    net = _darts(genotype).train(training)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g)
    before = [b.clone() for b in net.buffers()]
    bounds = interval_margins(net, x, y, 0.002, crown_ibp=True)
    after_engine = [b.clone() for b in net.buffers()]
    assert _relative(bounds.ibp, margin_lower_bounds(net, x, y, 0.002, method="ibp")) < 1e-5
    assert _relative(bounds.crown_ibp, margin_lower_bounds(net, x, y, 0.002, method="crown-ibp")) < 1e-5
    if training:  # the bound pass updates batch-norm statistics exactly as one clean forward pass does
        with torch.no_grad():
            for b, old in zip(net.buffers(), before):
                b.copy_(old)
            net(x)
        for b, engine in zip(net.buffers(), after_engine):
            assert torch.allclose(b, engine)




@pytest.mark.parametrize("genotype", ["DARTS_V1", "DARTS_V2"])
def test_duplicated_operations_on_one_input_are_never_tighter_than_auto_lirpa(genotype):
    """The DARTS cells' reductions apply max_pool_3x3 to one input two or three times. auto_LiRPA's
    graph optimiser merges the copies into one (tighter) relaxation; this engine relaxes each copy,
    which is sound and never tighter."""
    net = _darts(genotype).eval()
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    mine = interval_margins(net, x, y, 0.002, crown_ibp=True).crown_ibp
    reference = margin_lower_bounds(net, x, y, 0.002, method="crown-ibp")
    assert (mine <= reference + 1e-5 * (1 + reference.abs().max())).all()




@pytest.mark.parametrize("crown_ibp", [False, True], ids=["ibp", "crown-ibp"])
def test_darts_network_bounds_hold_at_sampled_and_attacked_points(crown_ibp):
    net = _darts("PC_DARTS", seed=1).eval()
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    lower, upper = interval_logit_bounds(net, x, 0.004, crown_ibp=crown_ibp)
    tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
    assert max_violation(net, x, 0.004, math.inf, lower.detach(), upper.detach(), samples=24, pgd_steps=15) <= tolerance




def test_sparse_crown_skips_the_neurons_ibp_proves_stable_and_stays_sound_on_a_trained_like_network():
    """With a small eps most neurons are stable: sparse CROWN back-substitutes only the others. Its
    bounds equal matrix mode's (the same neurons are skipped there) and hold on sampled points."""
    net = _darts("DARTS_V2", layers=2, channels=4, seed=4).eval()
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    sparse = compute_bounds(net, x, 0.001, method="crown")
    matrix = compute_bounds(net, x, 0.001, method="crown", conv_mode="matrix")
    dense = compute_bounds(net, x, 0.001, method="crown", sparse=False)
    assert _relative(sparse[0], matrix[0]) < 1e-5 and _relative(sparse[1], matrix[1]) < 1e-5
    assert not torch.equal(sparse[0], dense[0])  # the option changes the computation
    for lower, upper in (sparse, dense):
        tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
        assert max_violation(net, x, 0.001, math.inf, lower.detach(), upper.detach(), samples=24,
                             pgd_steps=15) <= tolerance




def test_crown_runs_on_a_darts_network_in_patches_mode_and_is_sound():
    net = _darts("PC_DARTS", layers=2, channels=4, seed=2).eval()
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    lower, upper = compute_bounds(net, x, 0.002, method="crown")
    crown_ibp = compute_bounds(net, x, 0.002, method="crown-ibp")
    assert (lower >= crown_ibp[0] - 1e-4).all() and (upper <= crown_ibp[1] + 1e-4).all()  # CROWN is tighter
    tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
    assert max_violation(net, x, 0.002, math.inf, lower.detach(), upper.detach(), samples=24, pgd_steps=15) <= tolerance




@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_l2_bounds_of_normalised_certnas_networks_are_sound(method):
    from certnas.space.genotype import NAMED
    from certnas.space.network import NetworkConfig, build_network
    from tests.violation import max_violation
    for config in (NetworkConfig("mlp", 1, 6, 4, (0.3,), (0.2,), hidden=(12, 12)),
                   NetworkConfig("darts", 1, 8, 4, (0.3,), (0.2,), genotype=NAMED["PC_DARTS"].to_dict(), layers=3,
                                 init_channels=4)):
        if method == "crown" and config.kind == "darts":
            continue
        torch.manual_seed(0)
        net = build_network(config).eval()
        x = torch.rand(3, 1, config.image_size, config.image_size)
        eps = torch.full((3,), 0.3)
        lower, upper = compute_bounds(net, x, eps, norm="2", method=method)
        assert (upper - lower).min() > 0  # not the zero-width interval of the centre point
        assert max_violation(net, x, eps, 2.0, lower.detach(), upper.detach(), samples=32, pgd_steps=20) <= 1e-5
