"""The benchmark scripts run and write their records (tiny sizes; no timing is asserted)."""
import json

import pytest

from benchmarks import bench_bounds, bench_search


@pytest.mark.slow
def test_bench_bounds_writes_a_record(tmp_path):
    out = tmp_path / "bounds.json"
    bench_bounds.main(["--cells", "3", "--channels", "4", "--size", "8", "--batch", "4", "--repeats", "1",
                       "--warmup", "0", "--out", str(out)])
    record = json.loads(out.read_text())
    assert [row["method"] for row in record["rows"]] == ["plain", "ibp", "crown-ibp"]
    assert all(row["seconds"] > 0 and row["saved_MiB"] >= 0 for row in record["rows"])
    assert record["environment"]["torch"]


@pytest.mark.slow
def test_bench_search_writes_a_record(tmp_path):
    out = tmp_path / "search.json"
    bench_search.main(["--layers", "2", "--init-channels", "4", "--batch-size", "4", "--metric-samples", "2",
                       "--repeats", "1", "--warmup", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["metric"] == "none" and rows[0]["ratio"] == 1.0 and len(rows) == 8


@pytest.mark.slow
def test_bench_train_writes_a_record(tmp_path):
    from benchmarks import bench_train
    out = tmp_path / "train.json"
    bench_train.main(["--layers", "2", "--init-channels", "4", "--batch-size", "4", "--repeats", "1", "--warmup", "0",
                      "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["mode"] for row in rows] == list(bench_train.VARIANTS) and rows[0]["ratio"] == 1.0
    assert all(row["peak_MiB"] > 100 for row in rows)
    bench_train.main(["--cnn", "c4k3s2,f8", "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--no-memory",
                      "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["settings"]["cnn"] == "c4k3s2,f8" and len(record["rows"]) == len(bench_train.VARIANTS)


@pytest.mark.slow
def test_bench_verify_writes_a_record(tmp_path):
    from benchmarks import bench_verify
    out = tmp_path / "verify.json"
    bench_verify.main(["--n", "3", "--milp-n", "1", "--steps", "2", "--layers", "2", "--init-channels", "4",
                       "--hidden", "8", "--bab-n", "2", "--bab-seconds", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert any("batched" in row["what"] and row["speedup"] > 0 for row in rows)
    bab = rows[-1]
    assert bab["what"].startswith("mlp bab") and bab["subdomains"] >= 0 and bab["peak_MiB"] > 50
    assert set(bab["verdicts"].split(",")) <= {"unsat", "sat", "timeout"} and len(bab["verdicts"].split(",")) == 2


@pytest.mark.slow
def test_width_gain_ranks_operations_and_writes_a_record(tmp_path):
    from benchmarks import width_gain
    out = tmp_path / "gain.json"
    result = width_gain.main(["--seeds", "1", "--out", str(out)])
    gains = {row["operation"]: row["gain"] for row in result["operations"]}
    assert gains["none"] == 0 and gains["skip_connect"] == pytest.approx(1.0)
    assert gains["avg_pool_3x3"] < gains["dil_conv_3x3"] < gains["sep_conv_3x3"] < gains["sep_conv_5x5"]
    assert json.loads(out.read_text())["networks"][0]["cell"] == "DARTS_V1"


def _mlp_file(path, in_channels=1, size=28, **meta):
    import torch
    from certnas.data import INFO
    from certnas.io import save_model
    from certnas.space.network import NetworkConfig, build_network
    info = INFO["mnist-embedded"]
    torch.manual_seed(0)
    config = NetworkConfig("mlp", in_channels, size, 10, info.mean, info.std, hidden=(16, 16))
    save_model(build_network(config), path, network=config.to_dict(), **meta)
    return path


def test_crown_radius_writes_radii_below_the_attack_radius(tmp_path):
    from benchmarks import crown_radius
    out = tmp_path / "crown_radius.json"
    crown_radius.main(["--model", str(_mlp_file(tmp_path / "mlp.pt")), "--n", "3", "--methods", "ibp,crown",
                       "--steps", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    assert len(record["rows"]) == 3
    for row in record["rows"]:
        assert 0 <= row["ibp"] <= row["attack"] and 0 <= row["crown"] <= row["attack"]
    assert record["summary"]["medians"]["crown"] == sorted(r["crown"] for r in record["rows"])[1]
    for bad in (["--methods", "milp"], ["--eps-min", "0"]):
        with pytest.raises(SystemExit) as stop:
            crown_radius.main(["--model", str(tmp_path / "mlp.pt"), *bad, "--out", str(out)])
        assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:  # not a network of the embedded digits
        crown_radius.main(["--model", str(_mlp_file(tmp_path / "rgb.pt", 3, 32)), "--out", str(out)])
    assert stop.value.code == 2


@pytest.mark.slow
def test_bench_radius_compares_both_searches_and_records_its_arguments(tmp_path):
    """On a tiny MLP: both methods give a radius per digit and norm, never above the attack radius, the root
    search's at least 0.99 of the bisection's (the issue's bar); the record holds the command as typed."""
    from benchmarks import bench_radius
    out = tmp_path / "radius.json"
    model = _mlp_file(tmp_path / "mlp.pt", dataset={"name": "mnist-embedded"})
    args = ["--model", str(model), "--n", "2", "--norms", "inf,2", "--threads", "1", "--out", str(out)]
    record = bench_radius.main(args)
    assert json.loads(out.read_text())["command"] == " ".join(["python -m benchmarks.bench_radius", *args])
    assert len(record["rows"]) == 8
    for row in record["rows"]:
        assert 0 <= row["radius"] <= row["pgd_radius"]
    for norm in ("inf", "2"):
        assert record["summary"][norm]["smallest_radius_ratio"] >= 0.99


@pytest.mark.slow
def test_jacobian_estimator_agrees_with_the_exact_term_and_flags_the_per_sample_draw(tmp_path):
    """The draws' mean gradient points where the exact one does (M=K would be exact: M=2 of 10 already
    agrees closely on average), while one class per sample does not (batch norm couples the samples)."""
    from benchmarks import jacobian_estimator
    result = jacobian_estimator.main(["--draws", "12", "--samples", "4", "--out", str(tmp_path / "j.json")])
    rows = {row["estimator"]: row for row in result["rows"]}
    assert rows["M=1 (default)"]["cos_of_mean"] > 0.95 and rows["M=2"]["cos_of_mean"] > 0.95
    assert rows["per-sample"]["cos_of_mean"] < rows["M=1 (default)"]["cos_of_mean"]


@pytest.mark.slow
def test_crown_profile_times_every_intermediate_node_and_pieces_change_nothing(tmp_path):
    """The profile of a 2-cell network (max pools, concatenations) gives the same margin bound with and
    without the piecewise back-substitution, and lists the cell output (a concatenation) among its nodes."""
    import torch
    from benchmarks import crown_profile
    from certnas.data import INFO
    from certnas.io import save_model
    from certnas.space.genotype import random_genotype
    from certnas.space.network import NetworkConfig, build_network
    info = INFO["mnist-embedded"]
    torch.manual_seed(0)
    config = NetworkConfig("darts", 1, 28, 10, info.mean, info.std, genotype=random_genotype(seed=4).to_dict(),
                           layers=2, init_channels=4, stem="strided")
    path = tmp_path / "net.pt"
    save_model(build_network(config).eval(), path, network=config.to_dict())
    whole = crown_profile.main([str(path), "--eps", "0.002", "--max-rows", "0", "--out", str(tmp_path / "a.json")])
    pieces = crown_profile.main([str(path), "--eps", "0.002", "--max-rows", "64", "--out", str(tmp_path / "b.json")])
    assert pieces["margin"] == pytest.approx(whole["margin"], rel=1e-5, abs=1e-5)
    assert any(node["kind"] == "BoundConcat" and node["start"].startswith("Patches") for node in whole["nodes"])
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["max_rows"] == 64
    # samples bounded together get the bounds each gets alone (the batch a GPU run uses)
    both = crown_profile.main([str(path), "--eps", "0.002", "--batch", "2", "--out", str(tmp_path / "c.json")])
    second = crown_profile.main([str(path), "--eps", "0.002", "--sample", "1", "--out", str(tmp_path / "d.json")])
    assert both["margins"] == pytest.approx([pieces["margin"], second["margin"]], rel=1e-5, abs=1e-5)


def test_crown_profile_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys):
    """A missing file, a bad eps, a sample past the split and a model for other inputs (CIFAR-sized
    channels against MNIST digits): one line on stderr and exit code 2, no traceback."""
    import torch
    from benchmarks import crown_profile
    from certnas.io import save_model
    from certnas.space.genotype import random_genotype
    from certnas.space.network import NetworkConfig, build_network
    config = NetworkConfig("darts", 3, 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                           genotype=random_genotype(seed=4).to_dict(), layers=2, init_channels=4, stem="strided")
    path = tmp_path / "rgb.pt"
    torch.manual_seed(0)
    save_model(build_network(config).eval(), path, network=config.to_dict())
    for args, message in [([str(tmp_path / "missing.pt")], "missing.pt"), ([str(path), "--eps", "0"], "--eps > 0"),
                          ([str(path), "--sample", "100000"], "test split has"),
                          ([str(path)], "does not take mnist-embedded inputs")]:
        with pytest.raises(SystemExit) as exit_info:
            crown_profile.main(args + ["--out", str(tmp_path / "p.json")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
