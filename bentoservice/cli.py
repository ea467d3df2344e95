"""The `bentoservice` command."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated, Optional

import typer

from bentoservice import store
from bentoservice.config import AdapterSpec
from bentoservice.training.commands import fine_tune_app, train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune open LLMs with LoRA and serve them OpenAI-compatible on BentoML.")
app.add_typer(fine_tune_app, name="fine-tune", help="Find finished fine-tunes: `get MODEL`, `list`.")
app.command("train")(train)


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


@app.command("import-adapter")
def import_adapter(name: Annotated[str, typer.Argument(help="store name for the adapter")],
                   adapter_id: Annotated[str, typer.Option(help="a PEFT folder or a hub id")],
                   base: Annotated[str, typer.Option(help="the base model it belongs to")] = "smollm2") -> None:
    """Put a PEFT LoRA adapter into the model store (kind=adapter, base=BASE)."""
    try:
        source = store.adapter_source(adapter_id)
        if source.base is not None and source.base != store.resolve_base(base).name:
            fail(f"the adapter was made for {source.base!r}, not {base!r}")
        typer.echo(store.save_adapter(name, source.folder, base, {"source": adapter_id}).tag)
    except (store.StoreError, OSError) as exc:
        fail(str(exc))


@app.command("merge")
def merge(base: Annotated[str, typer.Option(help="the base model")],
          lora: Annotated[str, typer.Option(help="the adapter: PEFT folder, store tag or hub id")],
          target: Annotated[str, typer.Option(help="store name of the merged model")]) -> None:
    """Merge a LoRA adapter into its base: a new base model in the store, servable like any other."""
    from bentoservice.training.merge import merge_adapter

    try:
        typer.echo(merge_adapter(base, lora, target).tag)
    except (store.StoreError, OSError, ValueError) as exc:
        fail(str(exc))


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
          adapter_id: Annotated[list[str], typer.Option(
              help="a LoRA adapter (PEFT folder, store tag or hub id); repeat for more; the first is the default")] = [],
          adapter_name: Annotated[list[str], typer.Option(help="the name of the adapter-id in the same position")] = [],
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
    if len(adapter_name) > len(adapter_id):
        fail("more --adapter-name than --adapter-id options")
    if adapter_id:
        specs = [AdapterSpec(id=src, name=adapter_name[i] if i < len(adapter_name) else None)
                 for i, src in enumerate(adapter_id)]
        env["BENTOSERVICE_ADAPTERS"] = json.dumps([spec.model_dump() for spec in specs])
    os.environ.update(env)
    args = [sys.executable, "-m", "bentoml", "serve", "bentoservice.service:LLM", "--port", str(port),
            "--host", host]
    os.execv(sys.executable, args)


if __name__ == "__main__":
    app()
