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
    assert rows[0]["metric"] == "none" and rows[0]["ratio"] == 1.0 and len(rows) == 7


@pytest.mark.slow
def test_bench_train_writes_a_record(tmp_path):
    from benchmarks import bench_train
    out = tmp_path / "train.json"
    bench_train.main(["--layers", "2", "--init-channels", "4", "--batch-size", "4", "--repeats", "1", "--warmup", "0",
                      "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["mode"] == "standard" and rows[0]["ratio"] == 1.0 and len(rows) == 7
    assert all(row["peak_MiB"] > 100 for row in rows)


@pytest.mark.slow
def test_bench_verify_writes_a_record(tmp_path):
    from benchmarks import bench_verify
    out = tmp_path / "verify.json"
    bench_verify.main(["--n", "3", "--milp-n", "1", "--steps", "2", "--layers", "2", "--init-channels", "4",
                       "--hidden", "8", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert any("batched" in row["what"] and row["speedup"] > 0 for row in rows)


@pytest.mark.slow
def test_width_gain_ranks_operations_and_writes_a_record(tmp_path):
    from benchmarks import width_gain
    out = tmp_path / "gain.json"
    result = width_gain.main(["--seeds", "1", "--out", str(out)])
    gains = {row["operation"]: row["gain"] for row in result["operations"]}
    assert gains["none"] == 0 and gains["skip_connect"] == pytest.approx(1.0)
    assert gains["avg_pool_3x3"] < gains["dil_conv_3x3"] < gains["sep_conv_3x3"] < gains["sep_conv_5x5"]
    assert json.loads(out.read_text())["networks"][0]["cell"] == "DARTS_V1"
