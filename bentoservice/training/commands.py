"""CLI pieces for bentoservice/cli.py: `fine-tune get|follow|list` and `train CONFIG.yaml`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from pydantic import ValidationError

from bentoservice import store
from bentoservice.config import get_settings

if TYPE_CHECKING:
    from bentoservice.client import Client

fine_tune_app = typer.Typer(help="Follow and show fine-tuning jobs; find finished fine-tunes.", no_args_is_help=True)


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


URL = Annotated[str, typer.Option("--url", envvar="BENTOSERVICE_URL", help="The server's base URL.")]
API_KEY = Annotated[
    str | None,
    typer.Option("--api-key", envvar="BENTOSERVICE_API_KEY", help="The server's API key.", show_default=False),
]


@contextlib.contextmanager
def server_errors(url: str) -> Iterator[None]:
    """A server that is down or refuses the request: one line on stderr and exit code 1."""
    import openai

    try:
        yield
    except openai.APIStatusError as err:
        message = (err.body or {}).get("message") if isinstance(err.body, dict) else None
        typer.echo(f"error: {message or err.message}", err=True)
        raise typer.Exit(1) from None
    except openai.APIConnectionError:
        typer.echo(f"error: no bentoservice server answers at {url} (--url or BENTOSERVICE_URL)", err=True)
        raise typer.Exit(1) from None


def _client(url: str, api_key: str | None) -> Client:
    from bentoservice.client import Client

    return Client(url, api_key)


@fine_tune_app.command("get")
def get(
    target: Annotated[str, typer.Argument(help="A job id (ftjob-...), or a base model: store name or hub id.")],
    url: URL = "http://localhost:3000",
    api_key: API_KEY = None,
) -> None:
    """Show job JOB from the server (status, result files, the before/after evaluation as tables), or print the
    newest finished fine-tune folder of a base MODEL."""
    if target.startswith("ftjob-"):
        from bentoservice.training.jobs.view import print_job

        with server_errors(url):
            print_job(_client(url, api_key).fine_tuning.retrieve(target))
        return
    with user_errors():
        typer.echo(store.latest_fine_tune(target))


@fine_tune_app.command("follow")
def follow(
    job: Annotated[str, typer.Argument(help="The job id (ftjob-...).")],
    url: URL = "http://localhost:3000",
    api_key: API_KEY = None,
    poll: Annotated[float, typer.Option(help="Seconds between two looks at the job.")] = 1.0,
) -> None:
    """Follow a job's events as a progress bar (steps, loss, ETA) until it ends; print its final status. The exit
    code is 0 when it succeeded, 1 when it failed or was cancelled."""
    from bentoservice.training.jobs.view import StepBar

    with server_errors(url):
        bar = StepBar(job)
        try:
            for found, events in _client(url, api_key).fine_tuning.follow(job, poll):
                last = found
                for event in events:
                    if event["type"] != "metrics":
                        bar.bar.write(event["message"], file=sys.stderr)
                bar.update(events)
        finally:
            bar.close()
    model = f": {last['fine_tuned_model']}" if last.get("fine_tuned_model") else ""
    error = f": {last['error']['message']}" if (last.get("error") or {}).get("message") else ""
    typer.echo(f"{job} {last['status']} after {bar.steps()} steps{model}{error}")
    if last["status"] != "succeeded":
        raise typer.Exit(1)


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
