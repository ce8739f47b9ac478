"""The `steerkit` command: a thin Typer layer over the library.

Each command module registers its commands on :data:`app` (or a sub-app) when imported; add a
new command group by writing ``steerkit/cli/<name>.py`` and importing it in :func:`_load`.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import re
import sys
from typing import Any

import click
import typer
from typer.core import TyperGroup

from steerkit import __version__
from steerkit.cli.common import debug, print_error
from steerkit.errors import SteerkitError

try:  # typer >= 0.20 carries its own copy of click; its exceptions are the ones raised
    from typer._click.exceptions import ClickException as _ClickException
    from typer._click.exceptions import UsageError as _UsageError
    from typer.exceptions import Abort as _Abort
except ImportError:  # pragma: no cover - older typer on plain click
    from click.exceptions import Abort as _Abort  # type: ignore[assignment]
    from click.exceptions import ClickException as _ClickException  # type: ignore[assignment]
    from click.exceptions import UsageError as _UsageError  # type: ignore[assignment]


class _Group(TyperGroup):
    """The one error boundary: SteerkitError -> one red line on stderr, exit code 1; a usage
    error (unknown option, missing value) -> one red line, exit code 2.

    ``STEERKIT_DEBUG=1`` lets the traceback through instead.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)

        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except _ClickException as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                msg = " ".join(e.format_message().split())
                if isinstance(e, _UsageError):
                    ctx = getattr(e, "ctx", None)
                    argv = kwargs.get("args", args[0] if args else None)
                    path = ctx.command_path if ctx is not None else self._command_path(sys.argv[1:] if argv is None else list(argv))
                    msg = msg.rstrip(".") + f" (see `{path} --help`)"
                print_error(msg)
            sys.exit(e.exit_code)
        except _Abort:
            print_error("aborted", color="yellow")
            sys.exit(1)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            sys.exit(1)  # stdout closed early (e.g. piped into head)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)

    def _command_path(self, argv: list[str]) -> str:
        """``steerkit sub command`` as far as ``argv`` names (sub)commands."""
        path, cmd = ["steerkit"], self
        for a in argv:
            nxt = getattr(cmd, "commands", {}).get(a)
            if nxt is None:
                break
            path.append(a)
            cmd = nxt
        return " ".join(path)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SteerkitError as e:
            if debug():
                raise
            print_error(str(e))
            ctx.exit(1)
        except KeyboardInterrupt:
            print_error("interrupted", color="yellow")
            ctx.exit(130)


app = typer.Typer(
    name="steerkit",
    cls=_Group,
    help="Find persona SAE latents and steer language models with them.\n\nExample: steerkit generate \"hey I feel bored\" --add persona:0.3",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"steerkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Find persona SAE latents and steer language models with them."""


def _load() -> None:
    for mod in ("models", "generate", "directions", "interop", "sae", "extract", "screen", "finetune", "judge", "sweep", "serve", "demo", "monitor", "answers", "track", "compare"):
        try:
            importlib.import_module(f"steerkit.cli.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"steerkit.cli.{mod}":
                raise


def _unwrap(doc: str) -> str:
    """A docstring as --help shows it: the lines of each prose paragraph joined, so the terminal
    wraps them (typer's rich mode keeps single newlines); indented paragraphs (examples) and
    lists keep theirs."""
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.split("\n")
        if any(ln.startswith(" ") or re.match(r"([-*]|\d+\.) ", ln) for ln in lines) or para.startswith("\b"):
            out.append(para)
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def _unwrap_help(t: typer.Typer) -> None:
    for c in t.registered_commands:
        if c.help is None and c.callback is not None and c.callback.__doc__:
            c.help = _unwrap(c.callback.__doc__)
    for g in t.registered_groups:
        if g.typer_instance is not None:
            _unwrap_help(g.typer_instance)


_load()
_unwrap_help(app)


def main() -> None:
    app()
