"""The ``lungcad`` command: parses, calls library functions, reports. No logic lives here."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

from lungcad import __version__
from lungcad.cli import analyze as analyze_commands
from lungcad.cli import data as data_commands
from lungcad.cli import demo as demo_commands
from lungcad.cli import evaluate as evaluate_commands
from lungcad.cli import export as export_commands
from lungcad.cli import serve as serve_commands
from lungcad.cli import train_classify, train_malignancy, train_segment
from lungcad.errors import LungcadError

app = typer.Typer(
    name="lungcad",
    help="Find lung nodules in chest CT and estimate their malignancy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(
    help="Train the segmentation, classifier and malignancy models.", no_args_is_help=True
)
app.add_typer(train_app, name="train")

data_commands.register(app)
analyze_commands.register(app)
evaluate_commands.register(app)
export_commands.register(app)
serve_commands.register(app)
train_app.command("segment")(train_segment.segment)
train_app.command("classify")(train_classify.classify)
train_app.command("malignancy")(train_malignancy.malignancy)
demo_commands.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lungcad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
        force=True,
    )


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except LungcadError as exc:
        print(f"lungcad: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("lungcad: interrupted", file=sys.stderr)
        sys.exit(130)
