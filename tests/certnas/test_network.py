"""The discrete network: equal to the supernet with one-hot weights, fixed in eval mode, bounded soundly."""
import math

import pytest
import torch

from certnas.space.genotype import NAMED
from certnas.space.network import DartsNetwork, NetworkConfig, build_network
from certnas.space.supernet import SearchNetwork, edge_count
from tests.violation import max_violation
from verifiers.bounds import compute_bounds


def _one_hot_supernet_and_network(seed: int):
    torch.manual_seed(seed)
    supernet = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1, steps=4, multiplier=4,
                             mean=(0.13,), std=(0.31,))
    with torch.no_grad():
        supernet.arch_normal.normal_(0, 1)
        supernet.arch_reduce.normal_(0, 1)
    genotype = supernet.genotype()
    network = DartsNetwork(genotype, 4, 10, 3, 1, (0.13,), (0.31,), affine=False)
    primitives = supernet.primitives
    with torch.no_grad():
        for name, edges in (("normal", genotype.normal), ("reduce", genotype.reduce)):
            alpha = supernet.arch_normal if name == "normal" else supernet.arch_reduce
            alpha.fill_(-math.inf)
            alpha[:, primitives.index("none")] = 0.0  # edges not chosen contribute exactly zero
            for k, (op, source) in enumerate(edges):
                node = k // 2
                edge = sum(2 + i for i in range(node)) + source
                alpha[edge].fill_(-math.inf)
                alpha[edge, primitives.index(op)] = 0.0
    for c, (cell, super_cell) in enumerate(zip(network.cells, supernet.cells)):
        edges = genotype.reduce if cell.reduction else genotype.normal
        cell.preprocess0.load_state_dict(super_cell.preprocess0.state_dict())
        cell.preprocess1.load_state_dict(super_cell.preprocess1.state_dict())
        for k, (op, source) in enumerate(edges):
            edge = sum(2 + i for i in range(k // 2)) + source
            cell.ops[k].load_state_dict(super_cell.edges[edge].ops[primitives.index(op)].state_dict())
    network.stem.load_state_dict(supernet.stem.state_dict())
    network.classifier.load_state_dict(supernet.classifier.state_dict())
    assert edge_count(4) == 14
    return supernet, network


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_network_from_derived_genotype_equals_supernet_with_one_hot_weights(seed):
    supernet, network = _one_hot_supernet_and_network(seed)
    x = torch.rand(6, 1, 28, 28)
    for train_mode in (True, False):
        supernet.train(train_mode)
        network.train(train_mode)
        torch.testing.assert_close(network(x), supernet(x), rtol=1e-5, atol=1e-5)


def test_eval_mode_is_deterministic_and_training_mode_uses_drop_path_and_aux_head():
    torch.manual_seed(0)
    net = DartsNetwork(NAMED["DARTS_V2"], 4, 10, 3, 1, (0.1,), (0.3,), auxiliary=True)
    net.drop_path_prob = 0.5
    x = torch.rand(4, 1, 28, 28)
    net.eval()
    logits, aux = net.forward_with_aux(x)
    assert aux is None
    torch.testing.assert_close(net(x), net(x))
    net.train()
    outputs = [net.forward_with_aux(x) for _ in range(2)]
    assert outputs[0][1] is not None and outputs[0][1].shape == (4, 10)
    assert not torch.allclose(outputs[0][0], outputs[1][0])  # drop-path draws new masks


def test_network_config_round_trips_and_builds_both_kinds():
    darts = NetworkConfig("darts", 1, 28, 10, (0.1,), (0.3,), genotype=NAMED["PC_DARTS"].to_dict(), layers=3,
                          init_channels=4)
    assert NetworkConfig.from_dict(darts.to_dict()) == darts
    assert build_network(darts)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    mlp = NetworkConfig("mlp", 1, 8, 3, (0.0,), (1.0,), hidden=(5, 4))
    assert NetworkConfig.from_dict(mlp.to_dict()) == mlp
    assert build_network(mlp)(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    cnn = NetworkConfig("cnn", 1, 28, 10, (0.1,), (0.3,), convs=((16, 4, 2), (32, 4, 1)), hidden=(100,))
    assert NetworkConfig.from_dict(cnn.to_dict()) == cnn
    net = build_network(cnn)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    # padding (kernel - 1) // 2: 28 -> 14 (4x4 / 2) -> 13 (4x4 / 1), so the first fully connected layer reads 32 x 13 x 13
    assert [m.in_features for m in net if isinstance(m, torch.nn.Linear)] == [32 * 13 * 13, 100]
    with pytest.raises(ValueError, match="to nothing"):
        build_network(NetworkConfig("cnn", 1, 4, 3, (0.0,), (1.0,), convs=((4, 4, 2), (4, 4, 2), (4, 4, 2))))
    with pytest.raises(ValueError, match="unknown network kind"):
        build_network(NetworkConfig("resnet", 1, 8, 3, (0.0,), (1.0,)))


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_bounds_on_every_published_cell_network_are_sound(method):
    for name, genotype in NAMED.items():
        torch.manual_seed(1)
        net = DartsNetwork(genotype, 4, 10, 3, 1, (0.13,), (0.31,)).eval()
        x = torch.rand(2, 1, 16, 16)
        eps = torch.full((2,), 0.02)
        lower, upper = compute_bounds(net, x, eps, norm="inf", method=method)
        assert max_violation(net, x, eps, math.inf, lower, upper, samples=16, pgd_steps=10) <= 1e-5, name


def test_imagenet_stem_shrinks_maps_8x_round_trips_and_is_bounded_soundly():
    config = NetworkConfig("darts", 3, 64, 7, (0.5,) * 3, (0.25,) * 3, genotype=NAMED["DARTS_V2"].to_dict(), layers=3,
                           init_channels=8, stem="imagenet")
    assert NetworkConfig.from_dict(config.to_dict()) == config
    old_file = {k: v for k, v in config.to_dict().items() if k != "stem"}  # written before stems existed
    assert NetworkConfig.from_dict(old_file).stem == "cifar"
    torch.manual_seed(0)
    net = build_network(config).eval()
    x = torch.rand(2, 3, 64, 64)
    assert net(x).shape == (2, 7)
    first_cell_input = net.stem1(net.stem(net.normalize(x)))
    assert first_cell_input.shape[-1] == 8  # three stride-2 convolutions
    cifar = build_network(NetworkConfig(**{**config.to_dict(), "stem": "cifar"}))
    assert sum(p.numel() for p in cifar.parameters()) != sum(p.numel() for p in net.parameters())
    eps = torch.full((2,), 0.01)
    for method in ("ibp", "crown-ibp"):
        lower, upper = compute_bounds(net, x, eps, norm="inf", method=method)
        assert max_violation(net, x, eps, math.inf, lower, upper, samples=8, pgd_steps=5) <= 1e-5, method
    with pytest.raises(ValueError, match="unknown stem"):
        build_network(NetworkConfig(**{**config.to_dict(), "stem": "resnet"}))


def test_odd_reduction_names_the_cell_that_would_get_odd_maps():
    from certnas.space.network import odd_reduction
    assert odd_reduction(28, 2, "strided") is None and odd_reduction(28, 3, "cifar") is None
    assert odd_reduction(28, 3, "strided") == "cell 2 (a reduction cell) would get 7x7 maps"
    assert odd_reduction(64, 8, "imagenet") is None and odd_reduction(24, 8, "imagenet") is not None
    for size, layers, stem in ((28, 3, "cifar"), (28, 2, "strided"), (64, 5, "imagenet"), (28, 4, "strided")):
        config = NetworkConfig("darts", 1, size, 10, (0.5,), (0.5,), genotype=NAMED["DARTS_V2"].to_dict(),
                               layers=layers, init_channels=4, stem=stem)
        net = build_network(config).eval()
        x = torch.rand(1, 1, size, size)
        if odd_reduction(size, layers, stem) is None:
            assert net(x).shape == (1, 10)
        else:
            with pytest.raises(ValueError, match="even height and width"):
                net(x)


def test_strided_stem_halves_the_cells_resolution_keeps_the_parameters_and_is_bounded_soundly():
    from verifiers.interval import interval_logit_bounds
    config = NetworkConfig("darts", 1, 28, 10, (0.13,), (0.31,), genotype=NAMED["PC_DARTS"].to_dict(), layers=2,
                           init_channels=4, stem="strided")
    assert NetworkConfig.from_dict(config.to_dict()) == config
    torch.manual_seed(0)
    net = build_network(config).eval()
    x = torch.rand(2, 1, 28, 28)
    assert net(x).shape == (2, 10) and net.stem(net.normalize(x)).shape[-2:] == (14, 14)
    cifar = build_network(NetworkConfig(**{**config.to_dict(), "stem": "cifar"}))
    assert [p.shape for p in cifar.parameters()] == [p.shape for p in net.parameters()]  # only the stride differs
    assert cifar.stem(cifar.normalize(x)).shape[-2:] == (28, 28)
    eps = torch.full((2,), 0.01)
    for method in ("ibp", "crown-ibp"):
        lower, upper = compute_bounds(net, x, eps, norm="inf", method=method)
        assert max_violation(net, x, eps, math.inf, lower, upper, samples=8, pgd_steps=5) <= 1e-5, method
        mine = interval_logit_bounds(net, x, eps, crown_ibp=method == "crown-ibp")
        assert torch.allclose(mine[0], lower, atol=1e-4) and torch.allclose(mine[1], upper, atol=1e-4)


def test_grid_head_keeps_positions_loads_old_files_and_is_bounded_soundly_by_every_engine():
    from verifiers.interval import interval_logit_bounds
    config = NetworkConfig("darts", 1, 16, 10, (0.13,), (0.31,), genotype=NAMED["PC_DARTS"].to_dict(), layers=2,
                           init_channels=4, stem="strided", head_grid=4)
    assert NetworkConfig.from_dict(config.to_dict()) == config
    old_file = {k: v for k, v in config.to_dict().items() if k != "head_grid"}  # written before grid heads
    assert NetworkConfig.from_dict(old_file).head_grid == 1
    torch.manual_seed(0)
    net = build_network(config).eval()
    assert net.classifier.in_features == 16 * 4 * 4  # 4 nodes x 4 channels, 4x4 grid of the 8x8 maps
    x = torch.rand(2, 1, 16, 16)
    assert net(x).shape == (2, 10)
    eps = torch.full((2,), 0.01)
    for method in ("ibp", "crown-ibp", "crown"):
        lower, upper = compute_bounds(net, x, eps, norm="inf", method=method)
        assert max_violation(net, x, eps, math.inf, lower, upper, samples=8, pgd_steps=5) <= 1e-5, method
        if method != "crown":
            mine = interval_logit_bounds(net, x, eps, crown_ibp=method == "crown-ibp")
            assert torch.allclose(mine[0], lower, atol=1e-4) and torch.allclose(mine[1], upper, atol=1e-4)


def test_the_automatic_head_grid_divides_the_last_maps_and_one_that_does_not_is_refused():
    from certnas.config import ConfigError
    from certnas.data import DataInfo
    from certnas.train import TrainConfig, network_config
    info = DataInfo(name="mnist-embedded", in_channels=1, image_size=32, num_classes=10, mean=(0.13,), std=(0.31,))
    assert network_config(TrainConfig(head_grid=4), info).head_grid == 4  # 16x16 maps after the strided stem
    assert network_config(TrainConfig(), info).head_grid == 4  # automatic: the largest grid up to 7 dividing 16
    digits = DataInfo(name="mnist-embedded", in_channels=1, image_size=28, num_classes=10, mean=(0.13,), std=(0.31,))
    assert network_config(TrainConfig(), digits).head_grid == 7  # 14x14 maps
    assert network_config(TrainConfig(network="mlp"), digits).head_grid == 1
    with pytest.raises(ConfigError, match="--head-grid 3 does not divide the last cell's 16x16 maps"):
        network_config(TrainConfig(head_grid=3), info)
