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


@pytest.mark.parametrize("args,message", [
    (["--eps", "2/0"], "division by zero"), (["--eps", "abc"], "not a number"), (["--eps", "-1"], ">= 0"),
    (["--metric", "fgsm"], "Invalid value for '--metric'"), (["--device", "cuda:7"], "--device"),
    (["--data", "cifar10"], "needs --data-root"),
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
    result = CliRunner().invoke(main, ["-q", "search", "--metric", "clb", "--bound", "ibp", "--epochs", "1",
                                       "--layers", "3", "--init-channels", "4", "--train-limit", "8",
                                       "--val-limit", "8", "--batch-size", "8", "--eps", "2/255", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "genotype.json").read_text())
    assert saved["settings"]["eps"] == pytest.approx(2 / 255)
    assert len(saved["normal"]) == 8
