"""The `steerkit` command: a thin Typer layer over the library.

Each command module registers its commands on :data:`app` (or a sub-app) when imported; add a
new command group by writing ``steerkit/cli/<name>.py`` and importing it in :func:`_load`.
"""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperGroup

from steerkit import __version__
from steerkit.errors import SteerkitError

class _Group(TyperGroup):
    """The one error boundary: SteerkitError -> one red line on stderr, exit code 1.

    ``STEERKIT_DEBUG=1`` lets the traceback through instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        from steerkit.cli.common import debug, print_error

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
    import importlib

    for mod in ("models", "generate", "directions", "interop", "sae", "extract", "screen", "finetune", "judge", "sweep", "serve", "demo"):
        try:
            importlib.import_module(f"steerkit.cli.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"steerkit.cli.{mod}":
                raise


_load()


def main() -> None:
    app()
