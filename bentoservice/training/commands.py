"""CLI pieces for bentoservice/cli.py: `fine-tune create|get|follow|list` and `train CONFIG.yaml`."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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


def _follow(client: Client, job: str, poll: float) -> None:
    """The job's events as a progress bar (steps, loss, ETA) until it ends, then its final status on stdout; exit
    code 1 unless it succeeded."""
    from bentoservice.training.jobs.view import StepBar

    bar = StepBar(job)
    try:
        for found, events in client.fine_tuning.follow(job, poll):
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


POLL = Annotated[float, typer.Option(help="Seconds between two looks at the job.")]


@fine_tune_app.command("follow")
def follow(
    job: Annotated[str, typer.Argument(help="The job id (ftjob-...).")],
    url: URL = "http://localhost:3000",
    api_key: API_KEY = None,
    poll: POLL = 1.0,
) -> None:
    """Follow a job's events as a progress bar (steps, loss, ETA) until it ends; print its final status. The exit
    code is 0 when it succeeded, 1 when it failed or was cancelled."""
    with server_errors(url):
        _follow(_client(url, api_key), job, poll)


def _file_id(client: Client, given: str) -> str:
    """An uploaded file's id: `given` itself (file-...), or the id of `given` uploaded as a local file."""
    path = Path(given)
    if path.is_file():
        return str(client.files.create(path, purpose="fine-tune")["id"])
    if given.startswith("file-"):
        return given
    raise typer.BadParameter(f"{given!r} is neither a local file nor an uploaded file's id (file-...)")


def _body(extra: str | None) -> dict[str, Any]:
    try:
        body = json.loads(extra) if extra else {}
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"not JSON: {err}", param_hint="--body") from None
    if not isinstance(body, dict):
        raise typer.BadParameter("a JSON object of job fields", param_hint="--body")
    return body


@fine_tune_app.command("create")
def create(
    model: Annotated[str, typer.Argument(help="The base model (store name or hub id); for rerank, an encoder.")],
    training_file: Annotated[str, typer.Argument(help="A local JSONL file (uploaded first) or a file id.")],
    validation_file: Annotated[
        str | None, typer.Option(help="Held-out data: a local file or a file id (evaluated before and after).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="OpenAI's method type: supervised (the default) or dpo; reinforcement with a grader in --body."
        ),
    ] = None,
    n_epochs: Annotated[int | None, typer.Option(help="Epochs (1-50).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples a step (1-256).")] = None,
    learning_rate_multiplier: Annotated[float | None, typer.Option(help="Times the default learning rate.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="The run's seed (default: drawn and shown on the job).")] = None,
    body: Annotated[
        str | None,
        typer.Option(
            help="More of the job body as a JSON object: any field the API takes, e.g. '{\"max_steps\": 30}' or "
            'OPEA\'s \'{"General": {"task": "rerank"}}\'; the options above win over it.'
        ),
    ] = None,
    follow_: Annotated[bool, typer.Option("--follow", help="Then follow the job as `fine-tune follow` does.")] = False,
    url: URL = "http://localhost:3000",
    api_key: API_KEY = None,
    poll: POLL = 1.0,
) -> None:
    """Create a fine-tuning job (uploading local files first) and print its id; with --follow, then follow it
    with the live bar and exit as `fine-tune follow` does."""
    fields = _body(body)
    hyperparameters = {
        k: v
        for k, v in {
            "n_epochs": n_epochs,
            "batch_size": batch_size,
            "learning_rate_multiplier": learning_rate_multiplier,
        }.items()
        if v is not None
    }
    with server_errors(url):
        client = _client(url, api_key)
        fields.update({"model": model, "training_file": _file_id(client, training_file)})
        if validation_file:
            fields["validation_file"] = _file_id(client, validation_file)
        fields.update({k: v for k, v in {"suffix": suffix, "seed": seed}.items() if v is not None})
        if method:  # merged into a method block that --body may give (a reinforcement job's grader)
            block = fields.setdefault("method", {})
            block["type"] = method
            block.setdefault(method, {}).setdefault("hyperparameters", {}).update(hyperparameters)
        elif hyperparameters:
            fields["hyperparameters"] = hyperparameters
        # The SDK takes the rest of the body as it is (OpenWeights' and OPEA's fields too).
        job = client.openai.fine_tuning.jobs.create(
            model=fields.pop("model"), training_file=fields.pop("training_file"), extra_body=fields
        )
        typer.echo(job.id)
        if follow_:
            _follow(client, job.id, poll)


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
