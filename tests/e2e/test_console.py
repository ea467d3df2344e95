"""The web console at /ui, driven in headless Chromium (Debian's, through playwright's Python API) against a real
server: chat, upload checks, a fine-tune watched live, side-by-side compare, and the API key asked once.

Set BENTOSERVICE_CONSOLE_SCREENSHOTS to a folder to keep the screenshots and BENTOSERVICE_CONSOLE_MODEL to serve
another model than the tiny random one (`make screenshots` serves smollm2, whose answers read as text)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import pytest
from conftest import Server
from pydantic import BaseModel, ConfigDict, Field
from test_tool_calls import FORECAST, WEATHER

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Say hello number {i}."},
            {"role": "assistant", "content": f"Hello number {i}! Ahoy!"},
        ]
    }
    for i in range(8)
]
TIMEOUT_MS = 300_000


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: Annotated[str, Field(max_length=8)]
    rank: Annotated[int, Field(ge=1, le=9)]
    kind: Literal["town", "capital"]


MODEL = os.environ.get("BENTOSERVICE_CONSOLE_MODEL", "tiny")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
# Replies are waited for: SmolLM2 (`make screenshots`) can take longer than expect's default 5 s on a busy CPU.
sync_api.expect.set_options(timeout=60_000)
if not CHROMIUM.exists():
    pytest.skip(
        "no /usr/bin/chromium: run the tests through .ci/with-chromium (as root it installs Debian's)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny, smollm2, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(MODEL, env={"BENTOSERVICE_DATA_DIR": str(tmp_path_factory.mktemp("console-data"))})
    yield server
    server.stop()


@pytest.fixture
def page(browser: sync_api.Browser) -> Iterator[sync_api.Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def screenshot(page: sync_api.Page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("BENTOSERVICE_CONSOLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)
    assert (folder / name).stat().st_size > 10_000


def answer(server: Server, model: str, prompt: str) -> str:
    reply = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=16
    )
    return reply.choices[0].message.content


def send(page: sync_api.Page, prompt: str, max_tokens: int = 16) -> dict[str, Any]:
    """Sends one prompt from the playground, greedy; returns the (first) request's body, which is streamed."""
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    with page.expect_request("**/v1/chat/completions") as request:
        page.click("#send")
    body = request.value.post_data_json
    assert body["stream"] is True
    return body


def chat(page: sync_api.Page, prompt: str, panes: int, max_tokens: int = 16) -> list[str]:
    """Sends one prompt from the playground to a fresh chat; returns each pane's answer."""
    send(page, prompt, max_tokens)
    done = page.locator(".pane:not([hidden]) .message.assistant.done")
    sync_api.expect(done).to_have_count(panes)
    return [text for text in done.all_inner_texts()]


def test_console(server: Server, page: sync_api.Page, tmp_path: Path) -> None:
    assert httpx.get(f"{server.url}/ui", follow_redirects=True).text.startswith("<!doctype html>")
    page.goto(f"{server.url}/ui/")
    rows = page.locator("#model-list tbody tr")
    sync_api.expect(rows.first).to_contain_text(MODEL)
    sync_api.expect(rows.first).to_contain_text("base")

    # A service error becomes a readable message.
    page.fill("#load-id", "no-such-adapter")
    page.click("#load-form button")
    sync_api.expect(page.locator("#error")).to_contain_text("no-such-adapter")

    # The playground's default pick is the served model (its default adapter, none yet); the answer streams in.
    page.click("nav a[data-tab=playground]")
    sync_api.expect(page.locator("#chat-model")).to_have_value(MODEL)
    assert chat(page, "Hello there", 1) == [answer(server, MODEL, "Hello there")]

    # Uploads are checked at once: a broken line is named; a good file is reported with its format and rows.
    page.click("nav a[data-tab=data]")
    bad = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": ['
    page.set_input_files("#data-file", files=[{"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": bad}])
    page.click("#upload-form button")
    sync_api.expect(page.locator("#data-report.error")).to_contain_text(re.compile(r"bad\.jsonl: .*line 2"))
    good = "\n".join(json.dumps(r) for r in CHATS).encode()
    page.set_input_files("#data-file", files=[{"name": "chats.jsonl", "mimeType": "application/jsonl", "buffer": good}])
    page.click("#upload-form button")
    sync_api.expect(page.locator("#data-report.ok")).to_contain_text("chats.jsonl is valid")
    sync_api.expect(page.locator("#data-report.ok")).to_contain_text("8 rows")
    sync_api.expect(page.locator("#file-list tbody tr")).to_have_count(1)

    # A job from the form, watched live until it succeeds; the chart holds every logged training loss.
    page.click("#data-report a")
    sync_api.expect(page.locator("#job-train option")).to_have_count(1)
    form = page.locator("#job-form")
    form.locator("[name=max_steps]").fill("3")
    form.locator("[name=learning_rate]").fill("0.001")
    form.locator("[name=per_device_train_batch_size]").fill("2")
    form.locator("[name=suffix]").fill("ui")
    page.select_option("#job-valid", index=1)  # the same file: the job evaluates the base against the fine-tune
    page.click("#job-launch")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[1]
    sync_api.expect(page.locator("#job-cancel")).to_be_visible()
    sync_api.expect(page.locator("#job-status")).to_have_text("succeeded", timeout=TIMEOUT_MS)
    client = server.client()
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    losses = sorted((e.data["step"], e.data["loss"]) for e in events if "loss" in e.data)
    assert len(losses) == 3
    points = page.evaluate("Chart.getChart('loss-chart').data.datasets[0].data.map(p => [p.x, p.y])")
    assert [tuple(p) for p in points] == losses
    sync_api.expect(page.locator("#job-cancel")).to_be_hidden()
    sync_api.expect(page.locator("#job-pause")).to_be_hidden()
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job_id).data
    sync_api.expect(page.locator("#job-checkpoints tbody tr")).to_have_count(len(checkpoints))
    sync_api.expect(page.locator("#job-eval")).to_contain_text("train_loss")
    done = client.fine_tuning.jobs.retrieve(job_id)
    fine_tuned = done.fine_tuned_model
    sync_api.expect(page.locator("#job-facts")).to_contain_text(fine_tuned)
    # The validation curve, and the evaluation as tables: held-out figures, then the generations side by side.
    valid = sorted({e.data["step"]: e.data["valid_loss"] for e in events if "valid_loss" in e.data}.items())
    points = page.evaluate("Chart.getChart('loss-chart').data.datasets[1].data.map(p => [p.x, p.y])")
    assert valid and [tuple(p) for p in points] == valid
    evaluation = done.model_extra["evaluation"]
    held_out = page.locator("#job-held-out tbody tr")
    sync_api.expect(held_out).to_have_count(len(evaluation["base"]))
    sync_api.expect(held_out.first).to_contain_text(next(iter(evaluation["base"])))
    rows = page.locator("#job-samples tbody tr")
    sync_api.expect(rows).to_have_count(len(evaluation["samples"]))
    for row, sample in zip(rows.all(), evaluation["samples"], strict=True):
        cells = [c.strip() for c in row.locator("td").all_inner_texts()]
        assert cells == [sample["prompt"], sample["base"].strip(), sample["adapter"].strip(), sample["reference"]]
    screenshot(page, "console-job.png", tmp_path)

    page.click("nav a[data-tab=jobs]")
    sync_api.expect(page.locator("#job-list tbody tr")).to_have_count(1)
    page.select_option("#job-filter", "failed")
    sync_api.expect(page.locator("#job-list tbody tr")).to_have_count(0)
    page.select_option("#job-filter", "succeeded")
    sync_api.expect(page.locator("#job-list tbody tr")).to_contain_text(job_id)

    # The bare base and the new adapter, one prompt, side by side.
    page.click("nav a[data-tab=playground]")
    page.select_option("#chat-model", f"{MODEL}:base")
    page.check("#compare")
    page.select_option("#chat-model-b", fine_tuned)
    prompt = "What is the capital of France?"
    assert chat(page, prompt, 2) == [answer(server, f"{MODEL}:base", prompt), answer(server, fine_tuned, prompt)]
    screenshot(page, "console-playground.png", tmp_path)

    # The adapter made the default from the models page, and its card.
    page.click("nav a[data-tab=models]")
    row = page.locator("#model-list tbody tr", has_text=fine_tuned)
    row.get_by_role("button", name="Set default").click()
    sync_api.expect(row.locator("td").nth(1)).to_have_text("adapter (default)")
    assert httpx.get(f"{server.url}/v1/adapters").json()["default"] == fine_tuned
    row.get_by_role("button", name="Card").click()
    sync_api.expect(page.locator("#model-card")).to_contain_text("target_modules")
    page.click("#base-default")
    sync_api.expect(row.locator("td").nth(1)).to_have_text("adapter")
    assert httpx.get(f"{server.url}/v1/adapters").json()["default"] is None
    assert f"console       http://localhost:{server.port}/ui/" in server.output()  # `bentoservice start` says where


def test_console_with_api_key(tiny, browser: sync_api.Browser, page: sync_api.Page) -> None:
    server = Server("tiny", "--api-key", "sk-console")
    try:
        # The page itself holds nothing and loads without the key; the API behind it does not.
        assert httpx.get(f"{server.url}/ui/app.js").status_code == 200
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        page.goto(f"{server.url}/ui/")
        sync_api.expect(page.locator("#key-dialog")).to_be_visible()
        page.fill("#key-input", "sk-wrong")
        page.click("#key-save")
        sync_api.expect(page.locator("#key-dialog")).to_be_visible()  # refused: asked again
        page.fill("#key-input", "sk-console")
        page.click("#key-save")
        sync_api.expect(page.locator("#model-list tbody tr").first).to_contain_text("tiny")
        assert page.evaluate("sessionStorage.getItem('bentoservice.apiKey')") == "sk-console"
        page.reload()  # asked once: the tab keeps it
        page.click("nav a[data-tab=playground]")
        sync_api.expect(page.locator("#chat-model")).to_have_value("tiny")
        sync_api.expect(page.locator("#key-dialog")).to_be_hidden()
        assert chat(page, "Hi", 1)[0]
    finally:
        server.stop()


def test_playground_json_schema_and_tools(server: Server, page: sync_api.Page, tmp_path: Path) -> None:
    page.goto(f"{server.url}/ui/#/playground")
    sync_api.expect(page.locator("#chat-model")).to_have_value(MODEL)
    page.click("#chat-extras summary")
    sync_api.expect(page.locator("#json-schema")).to_be_hidden()
    page.select_option("#response-format", "json_schema")

    # A schema that is not JSON is refused in the page, readably, before anything is sent.
    page.fill("#json-schema", '{"type": "object",}')
    page.fill("#prompt", "A city?")
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url) if "chat/completions" in request.url else None)
    page.click("#send")
    sync_api.expect(page.locator("#error")).to_contain_text(re.compile(r"JSON schema: not valid JSON \(.+\)"))
    sync_api.expect(page.locator("#json-schema")).to_have_attribute("aria-invalid", "true")
    page.fill("#json-schema", "[1]")
    page.click("#send")
    sync_api.expect(page.locator("#error")).to_contain_text("JSON schema: must be a JSON object")
    assert not requests

    # The grammar holds the tiny random model to the schema: the streamed reply validates.
    page.fill("#json-schema", json.dumps(City.model_json_schema()))
    sync_api.expect(page.locator("#json-schema")).not_to_have_attribute("aria-invalid", "true")
    body = send(page, "A city?", max_tokens=120)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "playground", "schema": City.model_json_schema(), "strict": True},
    }
    done = page.locator("#pane-a .message.assistant.done")
    sync_api.expect(done).to_have_count(1)
    sync_api.expect(page.locator("#error")).to_be_hidden()
    City.model_validate_json(done.inner_text())

    # Tools with tool_choice auto: the tiny model answers in text or calls; either is shown, without an error.
    page.click("#chat-clear")
    page.select_option("#response-format", "text")
    page.fill("#tools", '{"type": "function"}')
    page.fill("#prompt", "Weather?")
    page.click("#send")
    sync_api.expect(page.locator("#error")).to_contain_text("tools: must be a JSON array of tool objects")
    page.fill("#tools", json.dumps([WEATHER]))
    body = send(page, "What is the weather in Paris?")
    assert "response_format" not in body and body["tools"] == [WEATHER] and body["tool_choice"] == "auto"
    sync_api.expect(page.locator("#pane-a .message.assistant.done")).to_have_count(1)
    sync_api.expect(page.locator("#pane-a .message.failed")).to_have_count(0)

    # tool_choice required: the reply is calls (the grammar makes them), streamed into the transcript by function
    # name and arguments.
    page.click("#chat-clear")
    page.fill("#tools", json.dumps([FORECAST]))
    page.select_option("#tool-choice", "required")
    body = send(page, "What is the weather in Paris?", max_tokens=150)
    assert body["tool_choice"] == "required"
    calls = page.locator("#pane-a .message.assistant.done .tool-call")
    sync_api.expect(calls.first).to_be_visible()
    shown = [(call.locator(".name").inner_text(), json.loads(call.locator("pre").inner_text())) for call in calls.all()]
    for name, arguments in shown:
        assert name == "get_forecast"
        jsonschema.validate(arguments, FORECAST["function"]["parameters"])
    screenshot(page, "console-tools.png", tmp_path)

    # Their results, typed under each call, go back with no further prompt: the history holds the calls as the SDK
    # would send them, then one tool message answering each.
    for i, call in enumerate(calls.all()):
        call.locator(".tool-result").fill(json.dumps({"celsius": 20 + i}))
    page.select_option("#tool-choice", "none")
    body = send(page, "", max_tokens=4)
    assert body["tool_choice"] == "none"
    [question, asked, *results] = body["messages"]
    assert question == {"role": "user", "content": "What is the weather in Paris?"}
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in asked["tool_calls"]] == shown
    assert results == [
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"celsius": 20 + i})}
        for i, call in enumerate(asked["tool_calls"])
    ]
    sync_api.expect(page.locator("#pane-a .message.assistant.done")).to_have_count(2)
    sync_api.expect(page.locator("#pane-a .message.failed")).to_have_count(0)
    sync_api.expect(page.locator("#pane-a .tool-result").first).to_be_disabled()

    # A named function, offered for each tool in the box: one call to it.
    page.click("#chat-clear")
    page.select_option("#tool-choice", "function:get_forecast")
    body = send(page, "Weather?", max_tokens=150)
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_forecast"}}
    sync_api.expect(page.locator("#pane-a .message.assistant.done .tool-call .name")).to_have_text(["get_forecast"])

    # The service's own refusal of a bad tool is shown as its message, naming the field.
    page.click("#chat-clear")
    page.fill("#tools", json.dumps([{"type": "function", "function": {"name": "bad name"}}]))
    send(page, "Hi")
    sync_api.expect(page.locator("#pane-a .message.failed")).to_contain_text("tools.0.function.name")
