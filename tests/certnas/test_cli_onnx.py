"""``certnas verify`` on ONNX files and VNNLIB properties: the same network gives the same verified
accuracy as a certnas model file and as ONNX, and the VNN-COMP answer is the last line printed."""
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from certnas.cli import main
from certnas.data import load_data
from certnas.io import load_model
from tests.verifiers.onnx_nets import robustness_property


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-cli")
    result = CliRunner().invoke(main, ["-q", "train", "--network", "mlp", "--hidden", "16", "--mode", "ibp", "--eps",
                                       "0.05", "--epochs", "2", "--warmup-epochs", "0", "--ramp-epochs", "1",
                                       "--train-limit", "512", "--out", str(folder / "train")])
    assert result.exit_code == 0, result.output
    pt = folder / "train" / "model.pt"
    onnx_path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(load_model(pt).eval(), torch.rand(1, 1, 28, 28), str(onnx_path), input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, opset_version=13, dynamo=False)
    return pt, onnx_path, folder


def test_an_onnx_export_verifies_exactly_like_the_model_file(models):
    pt, onnx_path, folder = models
    summaries = []
    for model, extra in ((pt, []), (onnx_path, ["--data", "mnist-embedded"])):
        out = folder / model.suffix[1:]
        result = CliRunner().invoke(main, ["-q", "verify", str(model), "--eps", "0.02", "--n", "40", "--method",
                                           "ibp,crown", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        summaries.append({r["method"]: r["accuracy"] for r in json.loads((out / "verify.json").read_text())["results"]})
    assert summaries[0] == summaries[1]
    assert summaries[0]["clean"] > 0.3  # a trained network, so the comparison means something


def test_vnnlib_answers_in_the_vnn_comp_format_for_onnx_and_model_files(models, tmp_path):
    pt, onnx_path, _ = models
    x, y = load_data("mnist-embedded", None, seed=0).test[0]
    model = load_model(pt).eval()
    label = int(model(x.unsqueeze(0)).argmax())
    prop = robustness_property(tmp_path / "p.vnnlib", (x - 0.002).clamp(0, 1), (x + 0.002).clamp(0, 1), label, 10)
    verdicts = []
    for path in (onnx_path, pt):
        result_file = tmp_path / f"{path.suffix[1:]}.txt"
        result = CliRunner().invoke(main, ["verify", str(path), "--vnnlib", str(prop), "--timeout", "60",
                                           "--result-file", str(result_file)])
        assert result.exit_code == 0, result.output
        verdict = result.stdout.strip().splitlines()[-1]
        assert verdict in ("sat", "unsat", "unknown", "timeout")
        assert result_file.read_text().splitlines()[0] == verdict
        verdicts.append(verdict)
    assert verdicts[0] == verdicts[1] == "unsat"  # eps 0.002 on an IBP-trained network: certified


@pytest.mark.parametrize("args,match", [
    (["--vnnlib", "{bad}"], "never closed"),
    (["--result-file", "{tmp}/r.txt"], "--result-file needs --vnnlib"),
    (["--vnnlib", "{tmp}/missing.vnnlib"], "cannot read"),
])
def test_bad_vnnlib_input_is_one_line_and_exit_code_2(models, tmp_path, args, match):
    _, onnx_path, _ = models
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(assert (<= X_0 1)\n")
    args = [a.format(bad=bad, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, ["verify", str(onnx_path), *args])
    assert result.exit_code == 2
    assert match in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_vnnlib_deadline_counts_start_up_only_in_a_process_started_for_the_command(monkeypatch):
    """A process started to run ``certnas verify --vnnlib`` counts its start-up against the timeout (VNN-COMP's
    rule); called from a longer-lived process (this test runner) the deadline starts now, or a runner that has
    lived longer than the timeout would answer timeout at once."""
    import sys
    import time
    from certnas import vnn_run
    monkeypatch.setattr(vnn_run, "process_started", lambda: -1e9)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/pytest", "-q"])
    before = time.perf_counter()
    assert before <= vnn_run.command_started() <= time.perf_counter()
    for program in ("/venv/bin/certnas", "/repo/certnas/cli.py"):
        monkeypatch.setattr(sys, "argv", [program, "verify"])
        assert vnn_run.command_started() == -1e9
