"""CLI pieces for bentoservice/cli.py: `fine-tune get|list` and `train CONFIG.yaml`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError

from bentoservice import store
from bentoservice.config import get_settings

fine_tune_app = typer.Typer(help="Find finished fine-tunes (LoRA adapter folders).", no_args_is_help=True)


@contextlib.contextmanager
def user_errors(source: str = "") -> Iterator[None]:
    """Errors the user can fix: one line on stderr and exit code 1, no traceback."""
    prefix = f"{source}: " if source else ""
    try:
        yield
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        typer.echo(f"error: {prefix}{where + ': ' if where else ''}{first['msg']}", err=True)
        raise typer.Exit(1) from None
    except (ValueError, OSError, yaml.YAMLError) as err:  # DataFormatError, StoreError, TrainingError are ValueErrors
        typer.echo(f"error: {prefix}{_one_line(err)}", err=True)
        raise typer.Exit(1) from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@fine_tune_app.command("get")
def get(model: Annotated[str, typer.Argument(help="Base model: store name or hub id.")]) -> None:
    """Print the newest finished fine-tune folder of MODEL."""
    with user_errors():
        typer.echo(store.latest_fine_tune(model))


@fine_tune_app.command("list")
def list_fine_tunes() -> None:
    """One line per finished fine-tune: model, version, folder (oldest first)."""
    root = get_settings().fine_tune_root
    folders = sorted(
        (p.parent for p in root.glob("*--*/*/adapter_model.safetensors")), key=lambda p: (p.stat().st_mtime, p.name)
    )
    for folder in folders:
        model = folder.parent.name.split("--", 1)[0]
        typer.echo(f"{model}\t{folder.name}\t{folder}")


def train(config: Annotated[Path, typer.Argument(help="A YAML file of TrainingConfig fields.")]) -> None:
    """Fine-tune as CONFIG.yaml says and store the adapter."""
    with user_errors(config.name):
        from bentoservice.training.config import TrainingConfig
        from bentoservice.training.jobs.callbacks import log_sink
        from bentoservice.training.methods.rl import run_reinforcement
        from bentoservice.training.methods.trainers import run_training

        settings = TrainingConfig.model_validate(yaml.safe_load(config.read_text()) or {})
        result = (run_reinforcement if settings.method == "grpo" else run_training)(settings, sink=log_sink)
        typer.echo(f"{result.tag}\t{result.adapter_path}")
