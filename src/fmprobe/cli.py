"""The `fmprobe` command line. Each command calls a library function; no logic lives here."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fmprobe.errors import FmprobeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print an FmprobeError as one clear message and exit 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FmprobeError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(2)

    return wrapper


@app.callback()
def main() -> None:
    """Probe and adapt pretrained vision/video foundation models on medical imaging tasks."""


@app.command()
@user_errors
def run(config: Path = typer.Argument(..., help="experiment YAML"),
        quiet: bool = typer.Option(False, help="no progress bars")) -> None:
    """Run one experiment: features (cached) -> heads x seeds -> metrics, CIs, baselines, flags, report."""
    from fmprobe.config import load_config
    from fmprobe.experiments.run import run_experiment
    from fmprobe.report.terminal import print_summary

    result = run_experiment(load_config(config), progress=not quiet)
    print_summary(console, result.metrics, result.run_dir)


@app.command()
@user_errors
def extract(config: Path = typer.Argument(..., help="experiment YAML")) -> None:
    """Fill the feature cache for an experiment (extracts only what is not cached yet)."""
    from fmprobe.features.extract import extract_command

    summary = extract_command(config)
    for key, value in summary.items():
        console.print(f"{key}: {value}", highlight=False)


@app.command()
@user_errors
def demo(out: Path = typer.Option(Path("fmprobe-demo"), help="folder for the demo data, cache and runs"),
         quiet: bool = typer.Option(False, help="no progress bars")) -> None:
    """The offline demo: MNI152 brain patches, DINOv2-S, linear and attentive probes, two tasks."""
    from fmprobe.demo.run import run_demo
    from fmprobe.report.terminal import print_summary

    results = run_demo(out, progress=not quiet)
    for result in results:
        print_summary(console, result.metrics, result.run_dir)
    console.print("\n[bold]Reports:[/]")
    for result in results:
        console.print(f"  {result.run_dir / 'report.html'}")
