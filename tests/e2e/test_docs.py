"""The docs check: every `bash` and `python` block of README.md and docs/*.md runs against a real server, as a new
user would paste it, unless the line before it says which tests cover it or why it cannot run here:

    <!-- docs-check: covered by tests/e2e/test_adapters.py::test_switch_default, tests/e2e/test_cli.py::test_x -->
    <!-- docs-check: skip (needs a GPU) -->

`pytest -rs tests/e2e/test_docs.py` lists the skipped blocks with their reasons.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, Server

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- docs-check: (?:skip \((?P<reason>[^)]+)\)|covered by (?P<tests>[^>]+?)) -->")
# curl answers an HTTP error with status 0 unless told otherwise: a refused request must fail the block.
CURL = 'curl() { command curl --fail-with-body --silent --show-error "$@"; echo; }\n'


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int
    language: str
    code: str
    skip: str | None  # why it cannot run here
    covered_by: tuple[str, ...]  # the tests that run what it shows

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def snippets() -> list[Snippet]:
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        index = 0
        while index < len(lines):
            fence = re.fullmatch(r"```(\w*)", lines[index])
            if not fence:
                index += 1
                continue
            end = lines.index("```", index + 1)
            before = next((line for line in reversed(lines[:index]) if line.strip()), "")
            mark = MARK.search(before)
            tests = mark.group("tests") if mark else None
            if fence.group(1) in ("bash", "python"):
                found.append(
                    Snippet(
                        str(page.relative_to(ROOT)),
                        index + 1,
                        fence.group(1),
                        "\n".join(lines[index + 1 : end]) + "\n",
                        mark.group("reason") if mark else None,
                        tuple(name.strip() for name in tests.split(",")) if tests else (),
                    )
                )
            index = end + 1
    return found


SNIPPETS = snippets()


def test_the_check_sees_the_pages_and_every_marker_marks_a_block() -> None:
    assert {"README.md", "docs/serving.md", "docs/fine-tuning.md"} <= {s.page for s in SNIPPETS}
    markers = sum(len(MARK.findall(page.read_text())) for page in PAGES)
    marked = sum(bool(s.skip or s.covered_by) for s in SNIPPETS)
    assert markers == marked, "a docs-check marker that is not right above a bash or python block"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=str)
def test_snippet(snippet: Snippet, request: pytest.FixtureRequest) -> None:
    if snippet.skip:
        pytest.skip(f"{snippet}: {snippet.skip}")
    if snippet.covered_by:
        for test in snippet.covered_by:  # each named test exists, so the suite runs what the block shows
            path, _, name = test.partition("::")
            assert re.search(rf"^(async )?def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), test
        return
    server: Server = request.getfixturevalue("smollm2_server")
    code = snippet.code.replace("http://localhost:3000", server.url).replace("localhost:3000", server.url)
    command = (
        ["bash", "-euo", "pipefail", "-c", CURL + code] if snippet.language == "bash" else [sys.executable, "-c", code]
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{snippet} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
