"""Adapters on demand: many more adapters than slots, found in the store, a watched folder or a source URL, loaded
on their first request; tiers, pinning, eviction, the bounded wait, metrics; every name form on every route."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Server
from test_adapters import PROMPT, make_adapter

from bentoservice import store

COUNT = 12
FT_NAME = "ft:tiny:pirate:59be0ad8"


@pytest.fixture(scope="module")
def folders(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("on-demand")
    return {"store": root / "store-src", "watched": root / "watched", "remote": root / "remote"}


@pytest.fixture(scope="module")
def stored(tiny, tiny_dir: Path, folders: dict[str, Path]) -> list[str]:
    """COUNT adapters in the model store, each with its own random weights."""
    names = []
    for i in range(COUNT):
        name = f"od-{i}"
        store.save_adapter(name, make_adapter(folders["store"] / name, tiny_dir, seed=100 + i), "tiny")
        names.append(name)
    return names


@pytest.fixture(scope="module")
def server(stored: list[str], tiny_dir: Path, folders: dict[str, Path]):
    folders["watched"].mkdir()
    make_adapter(folders["remote"] / "far-away", tiny_dir, seed=300)
    server = Server(
        "tiny",
        env={
            "BENTOSERVICE_MAX_LORAS": "2",
            "BENTOSERVICE_MAX_CPU_LORAS": "3",
            "BENTOSERVICE_MAX_LORA_RANK": "8",
            "BENTOSERVICE_ADAPTER_WAIT_S": "8",
            "BENTOSERVICE_ADAPTER_DIRS": str(folders["watched"]),
            "BENTOSERVICE_ADAPTER_SOURCE_URL": f"file://{folders['remote']}",
        },
    )
    yield server
    server.stop()


def complete(server: Server, model: str, prompt: str = PROMPT, **extra) -> str:
    done = server.client().completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra or None
    )
    return done.choices[0].text


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1{path}", json=body, timeout=60)


def tiers(server: Server) -> dict[str, str]:
    return {m["id"]: m.get("tier") for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}


def metric(server: Server, name: str, tier: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(rf'^{name}\{{[^}}]*tier="{tier}"[^}}]*\}} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_many_store_adapters_each_answer_by_name_under_concurrent_mixed_load(server: Server, stored: list[str]) -> None:
    assert {name: "disk" for name in stored}.items() <= tiers(server).items()
    first = {name: complete(server, name) for name in stored}  # each loaded on demand, 2 slots for 12
    assert len(set(first.values())) == COUNT, first
    assert complete(server, "tiny") not in first.values()
    first["tiny"] = complete(server, "tiny")
    read_before = metric(server, "bentoservice_adapter_loads_total", "disk")
    jobs = [stored[(i * 5) % COUNT] if i % 4 else "tiny" for i in range(3 * COUNT)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda model: complete(server, model), jobs))
    # Adapters were evicted to host memory and to disk and came back: the outputs are those of before, at temperature 0.
    assert answers == [first[m] for m in jobs]
    assert metric(server, "bentoservice_adapter_loads_total", "disk") > read_before  # read again after eviction
    listed = tiers(server)
    assert sorted(listed[name] for name in stored).count("gpu") == 2
    assert metric(server, "bentoservice_adapter_evictions_total", "gpu") >= COUNT - 2
    assert metric(server, "bentoservice_adapter_loads_total", "disk") >= COUNT
    in_slot = next(name for name in stored if listed[name] == "gpu")
    hits = metric(server, "bentoservice_adapter_requests_total", "gpu")
    assert complete(server, in_slot) == first[in_slot]  # a hit in a slot, counted as such
    assert metric(server, "bentoservice_adapter_requests_total", "gpu") == hits + 1
    assert "bentoservice_adapter_load_seconds_bucket" in httpx.get(f"{server.url}/metrics", timeout=10).text


def test_concurrent_first_requests_trigger_one_load(server: Server, tiny_dir: Path, folders: dict[str, Path]) -> None:
    make_adapter(folders["watched"] / "crowd", tiny_dir, seed=400)
    before = metric(server, "bentoservice_adapter_loads_total", "disk")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: complete(server, "crowd"), range(6)))
    assert len(set(answers)) == 1
    assert metric(server, "bentoservice_adapter_loads_total", "disk") == before + 1


def test_adapters_added_after_start_are_served_on_first_request(
    server: Server, tiny_dir: Path, folders: dict[str, Path]
) -> None:
    late = make_adapter(folders["store"] / "late", tiny_dir, seed=500)
    store.save_adapter("od-late", late, "tiny")  # e.g. trained by another replica
    shutil.copytree(make_adapter(folders["store"] / "dropped", tiny_dir, seed=501), folders["watched"] / "dropped")
    outputs = {name: complete(server, name) for name in ("od-late", "dropped", "far-away")}
    assert len(set(outputs.values())) == 3
    assert {"od-late", "dropped", "far-away"} <= set(tiers(server))
    # LoRAX's per-request adapter_id names the same adapter as model does
    assert complete(server, "tiny", adapter_id="far-away") == outputs["far-away"]


def test_unsafe_id_is_400_and_unknown_is_404(server: Server) -> None:
    for unsafe in ("../etc/passwd", "a b", "x" * 300, "/tmp/od-0"):
        with pytest.raises(openai.BadRequestError) as err:
            complete(server, unsafe)
        assert err.value.body["param"] == "model", unsafe
    with pytest.raises(openai.NotFoundError) as err:
        complete(server, "no-such-adapter")
    assert "store tag" in err.value.body["message"] and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        complete(server, "tiny", adapter_id="no-such-adapter")
    assert err.value.body["param"] == "adapter_id"


def test_every_adapter_route_accepts_every_name_form(
    server: Server, stored: list[str], folders: dict[str, Path]
) -> None:
    tag = store.get("od-3:latest").tag
    watched = folders["watched"] / "crowd"
    expected = complete(server, "od-3")
    # served name <- store tag; then the served name and the tag name it everywhere
    assert post(server, "/load_lora_adapter", {"lora_name": FT_NAME, "lora_path": tag}).status_code == 200
    assert (
        complete(server, FT_NAME) == complete(server, tag) == complete(server, "tiny", adapter_id=FT_NAME) == expected
    )
    for form in (FT_NAME, tag, "od-3"):
        listing = post(server, "/adapters", {"adapter_name": form})
        # od-3 was served by its store name before: its tag may name either served name of that folder
        assert listing.status_code == 200 and listing.json()["default"] in (FT_NAME, "od-3"), (form, listing.text)
        assert complete(server, "tiny") == expected
    assert post(server, "/adapters", {"adapter_name": None}).json()["default"] is None
    # /v1/adapters/load takes a served name, a store tag (name or name:version) and a path
    for i, form in enumerate((FT_NAME, tag, "od-3", str(watched))):
        response = post(server, "/adapters/load", {"adapter_id": form, "adapter_name": f"copy-{i}"})
        assert response.status_code == 200, (form, response.text)
    assert complete(server, "copy-0") == complete(server, "copy-1") == complete(server, "copy-2") == expected
    assert complete(server, "copy-3") == complete(server, "crowd")
    # unloading by served name, by store tag and by path
    for route, key, form in (
        ("/adapters/unload", "adapter_name", "copy-0"),
        ("/unload_lora_adapter", "lora_name", tag),
        ("/adapters/unload", "adapter_name", str(watched)),
    ):
        assert post(server, route, {key: form}).status_code == 200, form
    # what matches nothing says what is accepted
    for route, body, param in (
        ("/adapters/load", {"adapter_id": "ft:tiny:nope:12345678"}, "adapter_id"),
        ("/load_lora_adapter", {"lora_name": "x", "lora_path": "nope:v1"}, "lora_path"),
        ("/unload_lora_adapter", {"lora_name": "ft:tiny:nope:12345678"}, "lora_name"),
        ("/adapters/unload", {"adapter_name": "nope"}, "adapter_name"),
    ):
        response = post(server, route, body)
        error = response.json()["error"]
        assert response.status_code == 404 and error["param"] == param, (route, response.text)
        assert "served adapter name" in error["message"] and "store tag" in error["message"], error
    response = post(server, "/adapters", {"adapter_name": "ft:tiny:nope:12345678"})
    assert response.status_code == 400 and "store tag" in response.json()["error"]["message"]


def test_prefix_cache_entries_stay_with_their_adapter_across_slots(server: Server, stored: list[str]) -> None:
    # A prompt no other test sends, long enough for the prefix cache (on by default on a CPU), whose keys and values
    # are kept per adapter: a reloaded adapter must not reuse what another adapter left in its new slot, and reuses
    # its own (tests/unit/engine/test_lora_slots.py checks which entries are reused and when they go).
    prompt = "Zebras vote on seventeen purple moons while the quiet engineer counts every falling leaf twice"
    idle = [name for name in stored if tiers(server)[name] != "gpu"]
    y, x, z = idle[:3]
    reference = complete(server, y, prompt)  # y's own, in slot t: no entry of this prompt anywhere yet
    assert complete(server, x, prompt) != reference  # x into the other slot u, its keys and values kept under u
    complete(server, z)  # z evicts y, the least recently used, from slot t
    assert complete(server, y, prompt) == reference  # y back, evicting x from u: x's entries went with it


def test_a_source_url_adapter_changed_at_the_source_is_fetched_again_once_back_on_disk(
    server: Server, stored: list[str], tiny_dir: Path, folders: dict[str, Path]
) -> None:
    before = complete(server, "far-away")
    make_adapter(folders["remote"] / "far-away", tiny_dir, seed=301)  # a new version at the source URL
    assert complete(server, "far-away") == before  # in a slot: the copy read before
    for name in stored[:6]:  # 2 slots and 3 in host memory: far-away goes back to disk
        complete(server, name)
    assert tiers(server)["far-away"] == "disk"
    assert complete(server, "far-away") != before  # read again, from the new version


def test_pinned_adapter_survives_pressure_and_busy_slots_give_429(
    server: Server, stored: list[str], folders: dict[str, Path]
) -> None:
    response = post(server, "/load_lora_adapter", {"lora_name": "keeper", "lora_path": "od-0", "pinned": True})
    assert response.status_code == 200, response.text
    for name in stored[1:]:
        complete(server, name)
    assert tiers(server)["keeper"] == "gpu"
    listing = httpx.get(f"{server.url}/v1/adapters", timeout=10).json()
    assert [a["pinned"] for a in listing["data"] if a["name"] == "keeper"] == [True]
    # both slots pinned: a request for a third adapter waits its bounded time, then is refused with a 429
    # OpenLLM's route pins too
    body = {"adapter_id": "od-1", "adapter_name": "keeper-2", "pinned": True}
    assert post(server, "/adapters/load", body).status_code == 200
    try:
        with pytest.raises(openai.RateLimitError):
            complete(server, "od-5")
    finally:
        post(server, "/unload_lora_adapter", {"lora_name": "keeper-2"})
    assert complete(server, "keeper") == complete(server, "od-0")
