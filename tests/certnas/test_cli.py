"""The command line: help, version, errors as one line with exit code 2, a real search."""
import json

import click
import pytest
from click.testing import CliRunner

from certnas import __version__
from certnas.cli import main


def _commands():
    return [main] + list(main.commands.values())


def test_version_and_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.strip() == f"certnas, version {__version__}"
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "search" in result.output


@pytest.mark.parametrize("command", _commands(), ids=lambda c: c.name)
def test_every_option_has_help_text(command):
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{command.name} {param.opts} has no help"


def test_train_option_defaults_are_the_training_config_defaults():
    """The command line and the library default to the same recipe (options are written out in cli.py)."""
    import dataclasses
    from certnas.train import TrainConfig
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for param in main.commands["train"].params:
        if isinstance(param, click.Option) and param.name in defaults and param.name not in ("hidden", "data_root"):
            value = param.default
            if isinstance(param.type, click.ParamType) and isinstance(value, str) and param.name.startswith("eps"):
                value = param.type.convert(value, param, None)
            assert value == defaults[param.name], f"--{param.name}: cli {value!r}, TrainConfig {defaults[param.name]!r}"
            checked += 1
    assert checked >= 20


def test_search_option_defaults_are_the_search_config_defaults():
    import dataclasses
    from certnas.search import SearchConfig, WEIGHT_MODES
    from certnas import cli
    assert cli.WEIGHT_MODES == WEIGHT_MODES
    defaults = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
    checked = 0
    for param in main.commands["search"].params:
        if isinstance(param, click.Option) and param.name in defaults and param.name not in ("data_root", "eps"):
            value = int(param.default) if param.name == "order" else param.default
            assert value == defaults[param.name], f"--{param.name}: cli {value!r}, SearchConfig {defaults[param.name]!r}"
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("args,message", [
    (["--eps", "2/0"], "division by zero"), (["--eps", "abc"], "not a number"), (["--eps", "-1"], ">= 0"),
    (["--metric", "fgsm"], "Invalid value for '--metric'"), (["--device", "cuda:7"], "--device"),
    (["--data", "cifar10"], "needs --data-root"), (["--metric", "clb", "--term", "none"], "not both"),
    (["--term", "clb", "--strategy", "pgd", "--weight-mode", "ibp"], "the pgd strategy has its own weight step"),
    (["--metric", "sdarts-adv", "--weight-mode", "ibp"], "the sdarts-adv strategy has its own weight step"),
])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, args, message):
    result = CliRunner().invoke(main, ["search", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("certnas: error:"), result.output


def test_non_empty_out_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["search", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.output and "Traceback" not in result.output


def test_search_command_runs_and_writes_the_genotype(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["-q", "search", "--metric", "clb", "--bound", "ibp", "--epochs", "1", "--warmup-epochs", "0",
                                       "--layers", "2", "--init-channels", "4", "--train-limit", "8",
                                       "--val-limit", "8", "--batch-size", "8", "--eps", "2/255", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "genotype.json").read_text())
    assert saved["settings"]["eps"] == pytest.approx(2 / 255)
    assert len(saved["normal"]) == 8


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "train"
    result = CliRunner().invoke(main, ["-q", "train", "--network", "mlp", "--hidden", "16", "--mode", "ibp", "--eps",
                                       "0.05", "--epochs", "2", "--warmup-epochs", "0", "--ramp-epochs", "1",
                                       "--train-limit", "256", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "model.pt"


def test_train_and_attack_commands_write_their_files(cli_model, tmp_path):
    assert (cli_model.parent / "summary.json").is_file() and (cli_model.parent / "history.csv").is_file()
    result = CliRunner().invoke(main, ["attack", str(cli_model), "--attack", "fgsm,pgd", "--steps", "5", "--n", "40",
                                       "--eps", "8/255", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "worst-case" in result.output
    rows = (tmp_path / "attack.csv").read_text().splitlines()
    assert rows[0].startswith("attack,robust_accuracy") and len(rows) == 5  # header, clean, fgsm, pgd, worst-case


@pytest.mark.parametrize("args,message", [
    (["--eps", "2/0"], "division by zero"), (["--attack", "deepfool"], "unknown attack"),
    (["--n", "99999"], "larger than"), (["--data", "cifar10"], "needs --data-root"),
])
def test_attack_bad_input_is_one_line_with_exit_code_2(cli_model, args, message):
    result = CliRunner().invoke(main, ["attack", str(cli_model), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output


@pytest.mark.parametrize("command", ["attack", "verify"])
def test_a_file_that_is_not_a_certnas_model_is_one_line_with_exit_code_2(tmp_path, command):
    import torch
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    result = CliRunner().invoke(main, [command, str(tmp_path / "other.pt")])
    assert result.exit_code == 2 and "not a certnas file" in result.output, result.output


@pytest.mark.parametrize("args,message", [
    (["--mode", "trades"], "Invalid value for '--mode'"), (["--genotype", "nope.json"], "neither a file"),
    (["--hidden", "a,b", "--network", "mlp"], "--hidden"), (["--drop-path", "0.2", "--mode", "ibp"], "drop-path"),
])
def test_train_bad_input_is_one_line_with_exit_code_2(tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output


@pytest.mark.slow
def test_verify_command_writes_rows_and_summary(cli_model, tmp_path):
    result = CliRunner().invoke(main, ["verify", str(cli_model), "--n", "8", "--eps", "0.02", "--radius",
                                       "--radius-steps", "6", "--milp-time-limit", "20", "--crown-max-relus", "1000",
                                       "--out", str(tmp_path)])  # (CROWN on DARTS: test_verify_run)
    assert result.exit_code == 0, result.output
    assert "cascade" in result.output and "radius milp" in result.output
    summary = json.loads((tmp_path / "verify.json").read_text())
    accuracy = {row["method"]: row["accuracy"] for row in summary["results"]}
    assert accuracy["cascade"] <= accuracy["pgd-50"] <= accuracy["clean"]
    header = (tmp_path / "verify.csv").read_text().splitlines()[0].split(",")
    for column in ("label", "prediction", "margin_bound", "certified", "radius", "seconds"):
        assert column in header


@pytest.mark.parametrize("args,message", [
    (["--eps", "2/0"], "division by zero"), (["--eps", "abc"], "not a number"), (["--eps", "-1"], ">= 0"),
    (["--method", "deepfool"], "unknown method"), (["--n", "99999"], "larger than"),
    (["--data", "cifar10", "--data-root", "."], "cifar10: expected"),
])
def test_verify_bad_input_is_one_line_with_exit_code_2(cli_model, args, message):
    result = CliRunner().invoke(main, ["verify", str(cli_model), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output


def test_train_on_imagenet_files_with_the_imagenet_stem_reports_top5(tmp_path):
    from certnas.io import load_model_with_meta
    from tests.certnas.datafiles import write_imagefolder
    root = write_imagefolder(tmp_path / "data", classes=6, per_class=4, size=36)
    out = tmp_path / "train"
    result = CliRunner().invoke(main, ["train", "--data", "imagenet", "--data-root", str(root), "--image-size", "32",
                                       "--stem", "imagenet", "--layers", "3", "--init-channels", "8", "--epochs", "1",
                                       "--batch-size", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "top-5" in result.output
    model, meta = load_model_with_meta(out / "model.pt")
    assert meta["network"]["stem"] == "imagenet" and model.stem1 is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] <= summary["test_top5_acc"]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_sits_between_defaults_and_flags(tmp_path, suffix):
    settings = {"network": "mlp", "hidden": "8", "mode": "standard", "epochs": 3, "train-limit": 64, "lr": 0.01}
    path = tmp_path / f"settings{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["-q", "train", "--config", str(path), "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "config.json").read_text())
    assert written["epochs"] == 1                      # the flag wins over the file
    assert written["network"] == "mlp" and written["train_limit"] == 64 and written["lr"] == 0.01  # the file wins over defaults
    from certnas.train import TrainConfig
    assert written["batch_size"] == TrainConfig().batch_size  # untouched settings keep their defaults


@pytest.mark.parametrize("text,match", [('{"epoch": 2}', "unknown setting 'epoch' for 'certnas train'; did you mean '--epochs'"),
                                        ('{"epochs": "many"}', "epochs: 'many' is not a valid integer"),
                                        ('[1, 2]', "expected a mapping"),
                                        ('{"epochs": 2', "not valid JSON")])
def test_bad_config_files_are_one_line_and_exit_code_2(tmp_path, text, match):
    path = tmp_path / "settings.json"
    path.write_text(text)
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and match in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
