"""python: the user's `grade(sample, item) -> float` run in a sandboxed process (sandbox.py), one process a grade.
The source is loaded once at validation too, so a grader that fails to import is refused when it is given."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bentoservice.training.graders import protocol, sandbox
from bentoservice.training.graders.base import Grader
from bentoservice.training.graders.errors import GraderError, GradingFailed

# Run with `python -I -c`: reads {"source", "sample", "item"} (no sample: only load the source) on stdin, writes
# {"score"} or {"stage", "error"} on the stdout it was given; the user's own prints go to stderr.
WORKER = r"""
import json, os, sys, traceback
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
request = json.load(sys.stdin)
def reply(**fields):
    out.write(json.dumps(fields)); out.flush(); sys.exit(0)
scope = {"__name__": "grader"}
try:
    exec(compile(request["source"], "<grader>", "exec"), scope)
except BaseException:
    reply(stage="import", error=traceback.format_exc(limit=-3))
if not callable(scope.get("grade")):
    reply(stage="import", error="the source defines no function grade(sample, item)")
if "sample" not in request:
    reply(score=None)
try:
    score = scope["grade"](request["sample"], request["item"])
    score = float(score)
except BaseException:
    reply(stage="grade", error=traceback.format_exc(limit=-3))
reply(score=score)
"""


def default_limits() -> sandbox.Limits:
    from bentoservice.config import get_settings

    settings = get_settings()
    return sandbox.Limits(settings.grader_cpu_seconds, settings.grader_memory_mb, settings.grader_timeout_s)


class PythonGrader(Grader):
    def __init__(self, spec: protocol.Python, param: str, limits: sandbox.Limits | None = None) -> None:
        super().__init__(spec.name, param, {})
        if spec.image_tag is not None:
            raise GraderError(
                "image_tag is not supported: python graders run on this service's own interpreter", f"{param}.image_tag"
            )
        reason = sandbox.unavailable()
        if reason is not None:
            raise GraderError(f"python graders are refused on this server: {reason}", f"{param}.type")
        self.source, self.limits = spec.source, limits or default_limits()
        try:
            self._call({"source": self.source})
        except GradingFailed as exc:
            raise GraderError(exc.message, f"{param}.source") from None

    def _call(self, request: dict[str, Any]) -> float | None:
        where = f"{self.param}.source"
        try:
            done = sandbox.run([sys.executable, "-I", "-c", WORKER], json.dumps(request).encode(), self.limits)
        except subprocess.TimeoutExpired:
            raise GradingFailed(
                f"the python grader took longer than {self.limits.wall_seconds:g} s", "unresponsive_reward_error", where
            ) from None
        try:
            result = json.loads(done.stdout)
        except ValueError:
            stderr = done.stderr.decode(errors="replace").strip()[-500:]
            raise GradingFailed(
                f"the python grader was stopped (exit status {done.returncode}; its limits: "
                f"{self.limits.cpu_seconds} CPU s, {self.limits.memory_mb} MB): {stderr}",
                "python_grader_runtime_error",
                where,
            ) from None
        if "error" in result:
            what = "failed to load" if result["stage"] == "import" else "raised"
            raise GradingFailed(f"the python grader {what}: {result['error']}", "python_grader_runtime_error", where)
        return result["score"]

    def score(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        score = self._call({"source": self.source, "sample": sample, "item": item})
        assert score is not None  # a grade always gives a score
        return score
