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


CONFIGS = {"search": "certnas.search.SearchConfig", "train": "certnas.train.TrainConfig",
           "attack": "certnas.attack_eval.AttackConfig", "verify": "certnas.verify_run.VerifyConfig"}


def _config_class(name):
    import importlib
    module, cls = CONFIGS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_options_are_generated_from_the_config_fields_and_default_to_them(name):
    """Each setting is declared once, on its dataclass field: the option has its help, and the option
    defaults build exactly the dataclass defaults."""
    import dataclasses
    from certnas import cli
    cls, command = _config_class(name), main.commands[name]
    ctx = click.Context(command)
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    declared = [f for f in dataclasses.fields(cls) if f.metadata.get("help")]
    assert len(declared) >= 10
    values = {}
    for field in declared:
        option = options[field.name]
        assert option.help == field.metadata["help"]
        values[field.name] = option.type_cast_value(ctx, option.get_default(ctx))
    assert cli.config_from_options(cls, values) == cls()


def test_options_given_reach_the_config():
    from certnas import cli
    from certnas.train import TrainConfig
    command = main.commands["train"]
    ctx = command.make_context("train", ["--hidden", "5,4", "--eps", "2/255", "--auxiliary", "--head-grid", "7",
                                         "--eps-start", "1e-5", "--data-root", "/tmp/x", "--mode", "ibp"])
    settings = {k: v for k, v in ctx.params.items() if k not in ("out", "resume", "force", "config_file")}
    config = cli.config_from_options(TrainConfig, settings)
    assert (config.hidden, config.eps, config.auxiliary, config.head_grid, config.eps_start, config.data_root,
            config.mode) == ((5, 4), 2 / 255, True, 7, 1e-5, "/tmp/x", "ibp")
    ctx = main.commands["verify"].make_context("verify", ["m.pt", "--method", "ibp,crown", "--radius"])
    settings = {k: v for k, v in ctx.params.items() if k in {f for f in ctx.params} - {"model", "shard", "out", "vnnlib",
                                                                                          "timeout", "result_file",
                                                                                          "config_file"}}
    config = cli.config_from_options(_config_class("verify"), settings)
    assert config.methods == ("ibp", "crown") and config.radius is True and config.eps == 2 / 255


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


def test_a_named_recipe_reaches_the_training_and_flags_still_win(tmp_path):
    from tests.certnas.datafiles import write_mnist
    root = write_mnist(tmp_path / "data", train=40, test=20)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", "mnist-ibp-0.1", "--data-root", str(root),
                                       "--epochs", "1", "--batch-size", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "recipe mnist-ibp-0.1, the settings of 94.69% IBP-verified" in result.stderr   # what it reproduces
    written = json.loads((out / "config.json").read_text())
    assert written["epochs"] == 1 and written["batch_size"] == 20          # flags win over the recipe
    assert (written["data"], written["network"], written["cnn"], written["mode"], written["eps"],
            written["eps_train"]) == ("mnist", "cnn", "small", "ibp", 0.1, 0.2)  # the recipe over defaults
    from certnas.io import load_model_with_meta
    _, meta = load_model_with_meta(out / "model.pt")
    assert meta["network"]["kind"] == "cnn" and meta["training"]["eps_train"] == 0.2


@pytest.mark.parametrize("name", ["mnist-ibp-0.1", "mnist-crown-ibp-0.3"])
def test_every_named_recipe_holds_valid_train_settings(name):
    from certnas.recipes import RECIPES, recipe_settings
    assert name in RECIPES
    command = main.commands["train"]
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    ctx = click.Context(command)
    for key, value in recipe_settings(name).items():
        options[key.replace("-", "_")].type_cast_value(ctx, value)   # KeyError / BadParameter when stale


def test_an_unknown_recipe_name_is_one_line_naming_the_recipes(tmp_path):
    result = CliRunner().invoke(main, ["train", "--config", "mnist-ibp-9", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no such file, nor a named recipe" in result.stderr and "mnist-ibp-0.1" in result.stderr
    assert not (tmp_path / "run").exists()
    verify = CliRunner().invoke(main, ["verify", "model.pt", "--config", "mnist-ibp-0.1"])
    assert verify.exit_code == 2 and "cannot read" in verify.stderr      # recipes are train settings only


def test_the_option_reference_in_docs_is_current():
    """docs/cli.md is generated from the option declarations: regenerate it (python -m certnas.cli_reference
    --write) when an option changes."""
    from certnas.cli_reference import DOCS, reference
    assert DOCS.read_text() == reference()
