"""The `bentoservice` command."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import typer
from bentoml.exceptions import BentoMLException

from bentoservice import build, state, store
from bentoservice.config import AdapterSpec, get_settings
from bentoservice.training.commands import fine_tune_app, train

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune open LLMs with LoRA and serve them OpenAI-compatible on BentoML.",
)
app.add_typer(
    fine_tune_app,
    name="fine-tune",
    help="Jobs: `create MODEL FILE [--follow]`, `follow JOB`, `get JOB`; finished fine-tunes: `get MODEL`, `list`.",
)
app.command("train")(train)


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)  # a line per request


@app.command("import")
def import_(
    name: Annotated[str, typer.Argument(help="store name, e.g. smollm2")],
    model_id: Annotated[
        str | None, typer.Option(help="a local HF folder, a .gguf file or a hub id; default: the model card's source")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="embedding or rerank: an embedding or rerank model rather than an LLM (minilm is one)"),
    ] = None,
) -> None:
    """Import a base model (or an embedding or rerank model) into the BentoML model store."""
    try:
        if kind or name in store.BUNDLED_ENCODERS:
            model = store.import_encoder(name, model_id, kind or "embedding")
        else:
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
    for encoder in store.list_models():
        if encoder.kind in store.ENCODER_KINDS:
            origin = f"\tfine-tuned from {encoder.base}" if encoder.base else ""
            typer.echo(f"{encoder.tag}\t{encoder.model_id}\t{encoder.kind}{origin}")


@app.command("state")
def state_() -> None:
    """Print where this project's state lives (models, jobs, files, caches) and how much of it there is."""
    settings = get_settings()
    for location in state.locations(settings):
        typer.echo(f"{location.what}:\n    {location.where}    ({location.set_by})")
    typer.echo(", ".join(f"{number} {what}" for what, number in state.counts(settings).items()))


@app.command("reset")
def reset(yes: Annotated[bool, typer.Option("--yes", help="delete without asking")] = False) -> None:
    """Delete this project's state: its models in the store, jobs, files, fine-tunes, caches. Asks first."""
    settings = get_settings()
    typer.echo(
        f"This deletes {len(state.our_models())} model versions in {store.store_root()} (other models there stay) and:"
    )
    for path in state.deletable_paths(settings):
        typer.echo(f"    {path}")
    typer.echo("Stop the servers that use them first.")
    if not yes:
        typer.confirm("Delete?", abort=True)
    for line in state.reset(settings):
        typer.echo(f"deleted {line}")


@app.command("import-adapter")
def import_adapter(
    name: Annotated[str, typer.Argument(help="store name for the adapter")],
    adapter_id: Annotated[str, typer.Option(help="a PEFT folder or a hub id")],
    base: Annotated[str, typer.Option(help="the base model it belongs to")] = "smollm2",
) -> None:
    """Put a PEFT LoRA adapter into the model store (kind=adapter, base=BASE)."""
    try:
        source = store.adapter_source(adapter_id)
        if source.base is not None and source.base != store.resolve_base(base).name:
            fail(f"the adapter was made for {source.base!r}, not {base!r}")
        typer.echo(store.save_adapter(name, source.folder, base, {"source": adapter_id}).tag)
    except (store.StoreError, OSError) as exc:
        fail(str(exc))


@app.command("merge")
def merge(
    base: Annotated[str, typer.Option(help="the base model")],
    lora: Annotated[str, typer.Option(help="the adapter: PEFT folder, store tag or hub id")],
    target: Annotated[str, typer.Option(help="store name of the merged model")],
) -> None:
    """Merge a LoRA adapter into its base: a new base model in the store, servable like any other."""
    from bentoservice.training.methods.merge import merge_adapter

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


def _adapter_specs(adapter_id: list[str], adapter_name: list[str]) -> list[AdapterSpec]:
    """--adapter-id options, each named by the --adapter-name in the same position."""
    if len(adapter_name) > len(adapter_id):
        fail("more --adapter-name than --adapter-id options")
    return [
        AdapterSpec(id=src, name=adapter_name[i] if i < len(adapter_name) else None) for i, src in enumerate(adapter_id)
    ]


@app.command("start")
def start(
    model: Annotated[str, typer.Argument(help="base model: store name or hub id")] = "smollm2",
    model_id: Annotated[str | None, typer.Option(help="where to import the model from if missing")] = None,
    port: int = 3000,
    host: str = "0.0.0.0",
    api_key: Annotated[str | None, typer.Option(help="require `Authorization: Bearer KEY`")] = None,
    chat_template: Annotated[str | None, typer.Option(help="a named template or a Jinja string")] = None,
    adapter_id: Annotated[
        list[str],
        typer.Option(
            help="a LoRA adapter (PEFT folder, store tag or hub id); repeat for more; the first is the default"
        ),
    ] = [],
    adapter_name: Annotated[list[str], typer.Option(help="the name of the adapter-id in the same position")] = [],
    embedding_model: Annotated[
        list[str],
        typer.Option(
            help="an embedding model (store name or hub id) for /v1/embeddings; repeat for more; default: "
            "minilm; `none` serves none"
        ),
    ] = [],
    rerank_model: Annotated[
        list[str], typer.Option(help="a rerank model (store name or hub id) for /v1/rerank; repeat for more")
    ] = [],
) -> None:
    """Serve MODEL from the model store, OpenAI-compatible, with `bentoml serve`."""
    try:
        served = _served_model(model, model_id)
        encoders = {
            kind: [store.ensure_encoder(name, kind).name for name in names if name != "none"]
            for kind, names in (("embedding", embedding_model), ("rerank", rerank_model))
            if names
        }
    except (store.StoreError, OSError) as exc:
        fail(str(exc))
    env = {
        "BENTOSERVICE_MODEL": served.name,
        # where the jobs' graders reach this service (training.graders.ServiceModels.from_settings)
        "BENTOSERVICE_SERVICE_URL": os.environ.get("BENTOSERVICE_SERVICE_URL") or f"{_local_url(host, port)}/v1",
    }
    if api_key:
        env["BENTOSERVICE_API_KEY"] = api_key
    if chat_template:
        env["BENTOSERVICE_CHAT_TEMPLATE"] = chat_template
    if specs := _adapter_specs(adapter_id, adapter_name):
        env["BENTOSERVICE_ADAPTERS"] = json.dumps([spec.model_dump() for spec in specs])
    for kind, names in encoders.items():
        env[f"BENTOSERVICE_{kind.upper()}_MODELS"] = ",".join(names)
    os.environ.update(env)
    args = [sys.executable, "-m", "bentoml", "serve", "bentoservice.service:LLM", "--port", str(port), "--host", host]
    # In a process group of its own, so that a Ctrl-C or a group's SIGTERM reaches it once, through us.
    server = subprocess.Popen(args, process_group=0)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: server.send_signal(signum))
    threading.Thread(target=_announce, args=(server, host, port, served.name, bool(api_key)), daemon=True).start()
    code = server.wait()
    raise typer.Exit(code if code >= 0 else 128 - code)  # killed by a signal: the shell's convention


def _local_url(host: str, port: int) -> str:
    """The server's URL from this machine (a wildcard address is reached at 127.0.0.1)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def _announce(server: subprocess.Popen, host: str, port: int, model: str, api_key: bool) -> None:
    """Once the server answers /readyz: the URLs a person needs and a request to try."""
    probe = _local_url(host, port)
    while server.poll() is None:
        try:
            if httpx.get(f"{probe}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        return
    try:
        console = httpx.get(f"{probe}/ui/", timeout=5).status_code != 404
    except httpx.HTTPError:
        console = False
    base = probe.replace("127.0.0.1", "localhost", 1)
    auth = " -H 'Authorization: Bearer <your key>'" if api_key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    typer.echo(
        "\n".join(
            [
                f"bentoservice is ready, serving {model}:",
                f"  API base URL  {base}/v1",
                f"  docs          {base}/",
                *([f"  console       {base}/ui/"] if console else []),
                f"  try           curl {base}/v1/chat/completions{auth}"
                f" -H 'Content-Type: application/json' -d '{body}'",
            ]
        )
    )


@app.command("build")
def build_(
    model: Annotated[str, typer.Argument(help="base model: store name or hub id")],
    model_id: Annotated[str | None, typer.Option(help="where to import the model from if missing")] = None,
    target: Annotated[build.TargetName, typer.Option(help="the hardware the bento runs on")] = "cpu",
    adapter_id: Annotated[
        list[str],
        typer.Option(help="a LoRA adapter (PEFT folder, store tag or hub id); repeatable; the first is the default"),
    ] = [],
    adapter_name: Annotated[list[str], typer.Option(help="the name of the adapter-id at its position")] = [],
    containerize: Annotated[
        bool, typer.Option(help="then run `bentoml containerize` (docker, podman, nerdctl or buildah)")
    ] = False,
) -> None:
    """Build a bento of MODEL for one hardware target; it references the base model and adapters in the model
    store (folders are put in the store first). Prints the bento tag."""
    try:
        base = _served_model(model, model_id)
        bento = build.build_bento(base, target, _adapter_specs(adapter_id, adapter_name))
    except (store.StoreError, build.BuildError, BentoMLException, OSError) as exc:
        fail(str(exc))
    typer.echo(bento.tag)
    if containerize:
        engine = build.container_engine()
        if engine is None:
            fail(
                f"no container engine is running (tried {', '.join(build.CONTAINER_ENGINES)}): {bento.tag} was "
                f"not containerized; its Dockerfile is {build.dockerfile(bento)}"
            )
        raise typer.Exit(build.containerize(str(bento.tag), engine))


@app.command("deploy")
def deploy(
    bento: Annotated[str, typer.Argument(help="a bento tag, e.g. from `bentoservice build`")],
    config: Annotated[
        Path | None, typer.Option(help="a BentoCloud deployment config; default deploy/<the bento's target>.yaml")
    ] = None,
    name: Annotated[str | None, typer.Option(help="the deployment name")] = None,
    cluster: Annotated[str | None, typer.Option(help="the BentoCloud cluster")] = None,
    dry_run: Annotated[bool, typer.Option(help="print the `bentoml deploy` command only")] = False,
) -> None:
    """Deploy a bento to BentoCloud with `bentoml deploy` and its target's deployment config."""
    try:
        command = build.deploy_command(bento, config, name, cluster)
    except (build.BuildError, BentoMLException, OSError) as exc:
        fail(str(exc))
    if dry_run:
        typer.echo(shlex.join(command))
        return
    if subprocess.run(command).returncode:
        fail(
            "bentoml deploy failed: log in with `bentoml cloud login` and create the API key secret "
            "(see docs/building-and-deploying.md)"
        )


if __name__ == "__main__":
    app()
