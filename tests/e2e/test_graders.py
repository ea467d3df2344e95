"""OpenAI's grader endpoints through the official SDK on a real server (tiny model): validate, run, each grader
type, the judge (score_model) and the embedding model (cosine) called back through the service, the keys, 400s."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from conftest import Server

from bentoservice import store
from bentoservice.config import get_settings
from bentoservice.training.graders import GraderError, GradingFailed, ServiceModels, build_grader, sample_of
from bentoservice.training.graders.sandbox import unavailable

ADMIN, INFERENCE = "sk-graders-admin", "sk-graders-inference"


@pytest.fixture(scope="module")
def server(tiny: store.StoredModel) -> Iterator[Server]:
    server = Server(
        "tiny",
        env={
            "BENTOSERVICE_ADMIN_API_KEYS": ADMIN,
            "BENTOSERVICE_INFERENCE_API_KEYS": INFERENCE,
            "BENTOSERVICE_GRADER_TIMEOUT_S": "2",
        },
    )
    yield server
    server.stop()


def check(reference: str = "{{item.answer}}") -> dict:
    return {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_json.answer}}",
        "reference": reference,
        "operation": "eq",
    }


def test_validate_echoes_the_grader_and_refuses_bad_ones_in_openais_envelope(server: Server) -> None:
    client = server.client(ADMIN)
    assert client.fine_tuning.alpha.graders.validate(grader=check()).grader.operation == "eq"  # type: ignore[union-attr]
    cases = [
        ({**check(), "operation": "contains"}, "grader.operation"),
        (check("{{ answer }}"), "grader.reference"),
        ({"type": "unknown", "name": "x"}, "grader.type"),
        (
            {"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "meteor"},
            "grader.evaluation_metric",
        ),
        (
            {"type": "score_model", "name": "j", "model": "no-such-model", "input": [{"role": "user", "content": "x"}]},
            "grader.model",
        ),
        (
            {"type": "multi", "name": "m", "graders": {"exact": check()}, "calculate_output": "exact + other"},
            "grader.calculate_output",
        ),
    ]
    for grader, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.alpha.graders.validate(grader=grader)  # type: ignore[arg-type]
        assert caught.value.body["param"] == param, caught.value.body  # type: ignore[index]
    with pytest.raises(openai.PermissionDeniedError):
        server.client(INFERENCE).fine_tuning.alpha.graders.validate(grader=check())  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").fine_tuning.alpha.graders.validate(grader=check())  # type: ignore[arg-type]


def test_run_grades_a_sample_with_multi_over_string_check_similarity_and_cosine(server: Server) -> None:
    client = server.client(ADMIN)
    grader = {
        "type": "multi",
        "name": "score",
        "graders": {
            "exact": check(),
            "close": {
                "type": "text_similarity",
                "name": "close",
                "input": "{{sample.output_json.answer}}",
                "reference": "{{item.answer}}",
                "evaluation_metric": "fuzzy_match",
            },
            "meaning": {
                "type": "text_similarity",
                "name": "meaning",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "evaluation_metric": "cosine",
            },
        },
        "calculate_output": "0.5 * exact + 0.5 * close",
    }
    result = client.fine_tuning.alpha.graders.run(
        grader=grader,
        model_sample='{"answer": "kitten"}',  # type: ignore[arg-type]
        item={"answer": "sitting"},
    )
    assert result.reward == pytest.approx(0.5 * (1 - 5 / 13))
    assert result.sub_rewards["exact"] == 0.0
    assert result.sub_rewards["close"] == pytest.approx(1 - 5 / 13)
    assert -1.0 <= result.sub_rewards["meaning"] <= 1.0  # type: ignore[operator]
    assert result.metadata.type == "multi" and result.metadata.name == "score"
    assert not any(v for k, v in result.metadata.errors.model_dump().items() if isinstance(v, bool))
    missing = client.fine_tuning.alpha.graders.run(grader=check(), model_sample='{"answer": "x"}', item={})  # type: ignore[arg-type]
    assert missing.reward == 0.0 and missing.metadata.errors.invalid_variable_error


def test_run_with_score_model_asks_the_served_model_and_counts_its_tokens(server: Server) -> None:
    client = server.client(ADMIN)
    grader = {
        "type": "score_model",
        "name": "judge",
        "model": "tiny",
        "input": [
            {"role": "system", "content": "Grade from 0 to 10."},
            {"role": "user", "content": "Answer: {{sample.output_text}}. Expected: {{item.answer}}"},
        ],
        "range": [0, 10],
        "sampling_params": {"temperature": 0, "max_completions_tokens": 8, "seed": 1},
    }
    result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="4", item={"answer": "4"})  # type: ignore[arg-type]
    usage = result.api_model_grader_token_usage_per_model["tiny"]
    assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 5  # type: ignore[index]
    errors = result.metadata.errors
    # The tiny model's reply is random text: a number in it is the score (clamped), none is a parse error.
    assert (0.0 <= result.reward <= 10.0 and not errors.api_model_grader_parse_error) or (
        result.reward == 0.0 and errors.api_model_grader_parse_error
    )


@pytest.mark.skipif(unavailable() is not None, reason=f"no sandbox here: {unavailable()}")
def test_python_graders_run_sandboxed_and_fail_clearly(server: Server) -> None:
    client = server.client(ADMIN)
    source = "def grade(sample, item):\n    return float(sample['output_json']['n'] == item['n'])"
    grader = {"type": "python", "name": "py", "source": source}
    assert client.fine_tuning.alpha.graders.run(grader=grader, model_sample='{"n": 3}', item={"n": 3}).reward == 1.0  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="No module named 'nope'") as caught:
        client.fine_tuning.alpha.graders.validate(grader={"type": "python", "name": "py", "source": "import nope"})  # type: ignore[arg-type]
    assert caught.value.body["param"] == "grader.source"  # type: ignore[index]
    slow = {"type": "python", "name": "py", "source": "import time\ndef grade(s, i):\n    time.sleep(10)"}
    result = client.fine_tuning.alpha.graders.run(grader=slow, model_sample="x", item={})  # type: ignore[arg-type]
    assert result.reward == 0.0 and result.metadata.errors.unresponsive_reward_error
    failing = {"type": "python", "name": "py", "source": "def grade(s, i):\n    raise ValueError('bad item')"}
    result = client.fine_tuning.alpha.graders.run(grader=failing, model_sample="x", item={})  # type: ignore[arg-type]
    assert result.metadata.errors.python_grader_runtime_error
    assert "bad item" in (result.metadata.errors.python_grader_runtime_error_details or "")


def test_a_job_runner_reaches_the_service_from_its_settings(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner inherits the server's environment: `bentoservice start` put its own /v1 there."""
    children = [child.environ() for child in server._tree()]
    assert any(env.get("BENTOSERVICE_SERVICE_URL") == f"{server.url}/v1" for env in children)
    monkeypatch.setenv("BENTOSERVICE_SERVICE_URL", f"{server.url}/v1")
    monkeypatch.setenv("BENTOSERVICE_INFERENCE_API_KEYS", INFERENCE)
    get_settings.cache_clear()
    try:
        models = ServiceModels.from_settings()
        assert models is not None
        judge = {
            "type": "score_model",
            "name": "judge",
            "model": "tiny",
            "range": [0, 5],
            "input": [{"role": "user", "content": "Rate {{sample.output_text}} against {{item.answer}}."}],
            "sampling_params": {"max_completions_tokens": 4},
        }
        cosine = {
            "type": "text_similarity",
            "name": "cos",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "evaluation_metric": "cosine",
        }
        same = build_grader(cosine, models).grade(sample_of("a cat sat"), {"answer": "a cat sat"})
        assert same.score == pytest.approx(1.0, abs=1e-4)
        try:
            score = build_grader(judge, models).grade(sample_of("4"), {"answer": "4"}).score
            assert 0.0 <= score <= 5.0
        except GradingFailed as failed:  # the tiny model's random reply may hold no number
            assert failed.error == "model_grader_parse_error"
        assert models.usage["tiny"]["completion_tokens"] >= 1
        with pytest.raises(GraderError) as caught:
            build_grader({**judge, "model": "ft:tiny:nothing:12345678"}, models)
        assert caught.value.param == "grader.model"
    finally:
        get_settings.cache_clear()
