"""docs/cli.md, generated from the command line's own declarations (click), so it cannot drift from them.

    python -m certnas.cli_reference            # print it
    python -m certnas.cli_reference --write    # rewrite docs/cli.md (tests/certnas/test_cli.py checks it is current)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import click

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _option_line(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return f"- `{param.human_readable_name}` (argument)"
    names = " / ".join(f"`{n}`" for n in param.opts + param.secondary_opts)
    kind = param.type
    if isinstance(kind, click.Choice):
        what = " | ".join(str(c) for c in kind.choices)
    elif param.is_flag:
        what = "flag"
    else:
        what = kind.name.lower()
    default = param.default
    shown = ""
    if getattr(param, "show_default", False) or (default not in (None, False, ()) and not param.is_flag):
        shown = f"; default: `{param.show_default if isinstance(param.show_default, str) else default}`"
    text = " ".join((param.help or "").split())
    return f"- {names} ({what}{shown}): {text}"


def _command(name: str, command: click.Command) -> List[str]:
    lines = [f"## `certnas {name}`", "", " ".join((command.help or "").split()), ""]
    for param in command.params:
        if param.name == "help":
            continue
        lines.append(_option_line(param))
    return lines + [""]


def reference() -> str:
    """The Markdown reference of every command and option."""
    from certnas.cli import main
    context = click.Context(main)
    lines = ["# Command line", "",
             "Generated from the option declarations by `python -m certnas.cli_reference --write`; "
             "`certnas COMMAND --help` prints the same.", "",
             "Global options (before the command): " + "; ".join(_option_line(p)[2:] for p in main.params
                                                                  if p.name != "help"), ""]
    for name in main.list_commands(context):
        lines += _command(name, main.get_command(context, name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = reference()
    if "--write" in argv:
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        DOCS.write_text(text)
        print(f"written to {DOCS}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
