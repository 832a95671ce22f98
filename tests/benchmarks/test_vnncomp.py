"""The VNN-COMP runner on a small benchmark folder in the competition's layout: one robust and one violated
property, each decided in a process of its own, scored against the verdicts written beside them."""
import csv
import json

import pytest
import torch
import torch.nn as nn

from benchmarks import vnncomp
from tests.verifiers.onnx_nets import export, robustness_property


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    export(net, (1, 4), folder / "net.onnx")
    x = torch.rand(1, 4)
    with torch.no_grad():
        label = int(net(x).argmax())
    robustness_property(folder / "tiny.vnnlib", x - 1e-4, x + 1e-4, label, 3)  # a box too small to change the class
    robustness_property(folder / "wide.vnnlib", torch.zeros(1, 4), torch.ones(1, 4), (label + 1) % 3, 3)
    (folder / "bench_instances.csv").write_text("net.onnx,tiny.vnnlib,30\nnet.onnx,wide.vnnlib,30\n")
    (folder / "results_tools.csv").write_text("network,property,tool\nnet.onnx,tiny.vnnlib,UNSAT\nnet.onnx,wide.vnnlib,timeout\n")
    return folder, net, label


def test_every_instance_is_decided_in_its_own_process_and_scored(folder, tmp_path):
    path, net, label = folder
    assert vnncomp.main([str(path), "--out", str(tmp_path), "--threads", "1"]) == 0
    rows = list(csv.DictReader((tmp_path / "instances.csv").read_text().splitlines()))
    verdicts = {r["property"]: r for r in rows}
    assert verdicts["tiny.vnnlib"]["verdict"] == "unsat" and verdicts["tiny.vnnlib"]["outcome"] == "correct"
    # every class wins somewhere in [0, 1]^4 or not: whatever the verdict, a sat one was rechecked by onnxruntime
    wide = verdicts["wide.vnnlib"]
    assert wide["verdict"] in ("sat", "unsat") and wide["outcome"] == "unchecked" and wide["note"] == ""
    assert all(float(r["seconds"]) <= float(r["timeout"]) for r in rows)
    summary = list(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    assert summary[0]["decided"] == "2" and summary[0]["score (2021 rule)"] == "10"
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "run.json").is_file()
    # resuming finds both instances done and runs nothing
    assert vnncomp.main([str(path), "--out", str(tmp_path), "--threads", "1"]) == 0
    assert len(list(csv.DictReader((tmp_path / "instances.csv").read_text().splitlines()))) == 2
    # both runs are recorded, with the benchmark folder by name and not by this machine's path
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["folder"] == path.name and len(record["runs"]) == 2
    assert all(str(path) not in run["command"] and f"<DIR>/{path.name}" in run["command"] for run in record["runs"])


def test_a_wrong_counterexample_is_caught(folder, tmp_path):
    path, net, label = folder
    result = tmp_path / "result.txt"
    result.write_text("sat\n(" + " ".join(f"(X_{i} 0.5)" for i in range(4)) + " (Y_0 0.0))\n")
    problem = vnncomp.check_counterexample(result, path / "net.onnx", path / "tiny.vnnlib")
    assert "outside the input box" in problem


def test_bad_folders_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vnncomp.main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no such folder" in capsys.readouterr().err
    (tmp_path / "a_instances.csv").write_text("net.onnx,p.vnnlib,10\n")
    with pytest.raises(SystemExit) as exit_info:
        vnncomp.main([str(tmp_path)])
    assert exit_info.value.code == 2 and "missing net.onnx" in capsys.readouterr().err
