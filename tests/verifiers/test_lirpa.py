"""The compatibility patches that let auto-LiRPA 0.3 run on torch 2 / numpy 2."""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from verifiers import lirpa


def test_auto_lirpa_imports():
    assert lirpa.AUTO_LIRPA_VERSION == "0.3"
    shim = sys.modules["numpy.lib.arraysetops"]
    assert shim.isin(np.array([1, 2, 3]), [2]).tolist() == [False, True, False]


@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN", "CROWN-Optimized"])
def test_plain_cnn_bounds_trace_and_run(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.rand(2, 1, 8, 8)
    bounded = lirpa.BoundedModule(model, torch.zeros(1, 1, 8, 8))
    ptb = lirpa.PerturbationLpNorm(norm=math.inf, eps=0.02)
    lower, upper = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), method=method)
    out = model(x)
    assert (lower <= out + 1e-5).all() and (out <= upper + 1e-5).all()


def test_bounded_module_named_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    bounded = lirpa.BoundedModule(model, torch.zeros(1, 4))
    assert len(list(bounded.named_parameters())) == 4
    assert len(list(bounded.named_parameters(remove_duplicate=False))) == 4


def test_patches_and_matrix_mode_agree_on_per_position_constants():
    """Patch 6 unfolds a per-position factor into patches; it must equal the dense product."""
    from tests.verifiers.nets import op_net
    net = op_net("max_pool_3x3", 2, seed=1)
    x = torch.rand(2, 1, 8, 8)
    results = []
    for mode in ("patches", "matrix"):
        bounded = lirpa.BoundedModule(net, torch.zeros(1, 1, 8, 8), bound_opts={"conv_mode": mode})
        ptb = lirpa.PerturbationLpNorm(norm=math.inf, eps=0.05)
        results.append(bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), method="CROWN-IBP"))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_bounding_leaves_requires_grad_alone():
    from tests.verifiers.nets import op_net
    from verifiers.bounds import compute_bounds
    net = op_net("sep_conv_3x3", 1)  # eval mode
    compute_bounds(net, torch.rand(2, 1, 8, 8), 0.05, method="ibp")
    assert all(p.requires_grad for p in net.parameters())


def test_first_bound_call_keeps_earlier_graphs_usable():
    from tests.verifiers.nets import op_net
    from verifiers.bounds import margin_lower_bound
    net = op_net("mixed", 1, seed=7)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    loss = torch.nn.functional.cross_entropy(net(x), y)  # graph built before the first trace
    bound = margin_lower_bound(net, x, y, 0.01, method="crown-ibp")
    (loss - bound.mean()).backward()
    assert net.arch.grad is not None


def test_import_changes_no_warning_filters():
    import subprocess
    import sys
    code = ("import warnings, torch, torch.onnx; before = list(warnings.filters); import verifiers.lirpa; "
            "assert list(warnings.filters) == before, 'filters changed'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=__import__("pathlib").Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_an_untested_auto_lirpa_release_is_refused_in_one_line():
    """The patches replace auto_LiRPA internals: only the release they were tested with is accepted (the import
    of verifiers.lirpa runs this check on the installed version)."""
    from verifiers.errors import EnvironmentVersionError
    from verifiers.lirpa import TESTED_VERSIONS, _installed_version, check_version
    assert _installed_version() in TESTED_VERSIONS
    check_version(TESTED_VERSIONS[0])
    with pytest.raises(EnvironmentVersionError, match=r"patches auto-LiRPA 0\.3, and this environment has 0\.7\.1") as info:
        check_version("0.7.1")
    assert "\n" not in str(info.value)
