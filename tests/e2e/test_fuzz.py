"""Issue 18: schemathesis against the real server's OpenAPI document, every /v1 operation, with requests that fit
the schema and requests that break it: no 5xx, and every error in OpenAI's envelope. Bounded and derandomized
(the same cases each run) to fit the suite's budget; `make fuzz` is the longer run (FUZZ_EXAMPLES per operation)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import schemathesis
from conftest import Server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

ADMIN = "sk-fuzz"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "6"))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data: Path = tmp_path_factory.mktemp("fuzz-data")
    server = Server("tiny", "--api-key", ADMIN, env={"BENTOSERVICE_DATA_DIR": str(data)})
    yield server
    server.stop()


@dataclass
class Report:
    operations: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, case: Case, base_url: str) -> None:
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        problem = None
        if response.status_code >= 500:
            problem = f"a {response.status_code}"
        elif response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)) or set(
                body["error"]
            ) != {"message", "type", "param", "code"}:
                problem = f"a {response.status_code} outside OpenAI's envelope"
        if problem:
            self.failures.append(f"{problem}: {response.text[:300]}\n  {case.as_curl_command()}")


def test_no_request_gives_a_5xx_or_an_error_outside_the_envelope(server: Server) -> None:
    schema = schemathesis.openapi.from_url(
        f"{server.url}/v1/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
    )
    base_url = f"{server.url}/v1"
    report = Report()
    for result in schema.get_all_operations():
        operation = result.ok()
        report.operations.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Case) -> None:
                report.check(case, base_url)

            try:
                run()
            except Unsatisfiable:  # nothing of this operation's request can be made invalid (no body or query)
                assert mode is GenerationMode.NEGATIVE
    assert len(report.operations) >= 20, report.operations  # the whole API was reached, not an empty document
    assert not report.failures, f"{len(report.failures)} failures:\n" + "\n".join(report.failures[:30])
