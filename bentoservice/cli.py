"""The `bentoservice` command."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Optional

import typer

from bentoservice import store

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune open LLMs with LoRA and serve them OpenAI-compatible on BentoML.")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


@app.command("import")
def import_(name: Annotated[str, typer.Argument(help="store name, e.g. smollm2")],
            model_id: Annotated[Optional[str], typer.Option(
                help="a local HF folder, a .gguf file or a hub id; default: the model card's source")] = None,
            ) -> None:
    """Import a base model into the BentoML model store."""
    try:
        model = store.import_model(name, model_id)
    except (store.StoreError, OSError) as exc:
        fail(str(exc))
    typer.echo(model.tag)


@app.command("models")
def models() -> None:
    """List base models in the store, each with its adapters."""
    adapters = store.list_models(kind="adapter")
    for base in store.list_models(kind="base"):
        typer.echo(f"{base.tag}\t{base.model_id}\t{base.labels.get('architecture', '')}")
        for adapter in adapters:
            if adapter.base == base.name:
                typer.echo(f"  └─ {adapter.tag}\tadapter")


def _served_model(model: str, model_id: str | None) -> store.StoredModel:
    """The base model to serve, imported first when it is missing."""
    if model_id is None:
        return store.ensure_base(model)
    try:
        found = store.resolve_base(model_id)
        if found.name == model:
            return found
    except store.StoreError:
        pass
    return store.import_model(model, model_id)


@app.command("start")
def start(model: Annotated[str, typer.Argument(help="base model: store name or hub id")] = "smollm2",
          model_id: Annotated[Optional[str], typer.Option(help="where to import the model from if missing")] = None,
          port: int = 3000,
          host: str = "0.0.0.0",
          api_key: Annotated[Optional[str], typer.Option(help="require `Authorization: Bearer KEY`")] = None,
          chat_template: Annotated[Optional[str], typer.Option(help="a named template or a Jinja string")] = None,
          ) -> None:
    """Serve MODEL from the model store, OpenAI-compatible, with `bentoml serve`."""
    try:
        served = _served_model(model, model_id)
    except (store.StoreError, OSError) as exc:
        fail(str(exc))
    env = {"BENTOSERVICE_MODEL": served.name}
    if api_key:
        env["BENTOSERVICE_API_KEY"] = api_key
    if chat_template:
        env["BENTOSERVICE_CHAT_TEMPLATE"] = chat_template
    os.environ.update(env)
    args = [sys.executable, "-m", "bentoml", "serve", "bentoservice.service:LLM", "--port", str(port),
            "--host", host]
    os.execv(sys.executable, args)


if __name__ == "__main__":
    app()
