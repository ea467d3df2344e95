"""The graders on literal samples and items: every type, the templates, the formula, the judge's reply parser,
the python sandbox (a real sandboxed process)."""

from __future__ import annotations

import pytest

from bentoservice.training.graders import GraderError, GradingFailed, build_grader, sample_of
from bentoservice.training.graders.build import parse
from bentoservice.training.graders.python import PythonGrader
from bentoservice.training.graders.sandbox import Limits, unavailable
from bentoservice.training.graders.score_model import parse_score
from bentoservice.training.graders.templates import references, render


def check(op: str, text: str, reference: str = "{{item.answer}}") -> dict:
    return {"type": "string_check", "name": "check", "input": text, "reference": reference, "operation": op}


def similarity(metric: str) -> dict:
    return {
        "type": "text_similarity",
        "name": "sim",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "evaluation_metric": metric,
    }


def test_templates_render_sample_json_and_nested_items() -> None:
    sample = sample_of('{"answer": {"value": 42}, "steps": ["a", "b"]}')
    item = {"ref": {"names": ["x", "y"]}, "n": 3}
    text = "{{ sample.output_json.answer.value }}|{{item.ref.names.1}}|{{item.n}}|{{sample.output_json.steps}}"
    assert render(text, sample, item, "t") == '42|y|3|["a", "b"]'
    assert references(text, "t") == {"ref.names.1", "n"}


@pytest.mark.parametrize(
    "template",
    ["{{foo}}", "{{item}}", "{{sample.output}}", "{{ item.x + 1 }}", "{{ item.__class__ }}x{{sample.text}}"],
)
def test_templates_refuse_anything_but_references(template: str) -> None:
    with pytest.raises(GraderError) as caught:
        build_grader(check("eq", template))
    assert caught.value.param == "grader.input"


def test_a_missing_field_names_itself() -> None:
    grader = build_grader(check("eq", "{{sample.output_text}}", "{{item.answer.text}}"))
    with pytest.raises(GradingFailed, match=r"\{\{item.answer\}\} is missing") as caught:
        grader.grade(sample_of("x"), {})
    assert caught.value.error == "invalid_variable_error"
    with pytest.raises(GradingFailed) as caught:
        build_grader(check("eq", "{{sample.output_json.a}}", "x")).grade(sample_of("not json"), {})
    assert caught.value.error == "sample_parse_error"


@pytest.mark.parametrize(
    ("op", "text", "answer", "score"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "Paris ", "Paris", 0.0),
        ("ne", "Rome", "Paris", 1.0),
        ("like", "It is Paris.", "Paris", 1.0),
        ("like", "It is paris.", "Paris", 0.0),
        ("ilike", "It is PARIS.", "paris", 1.0),
    ],
)
def test_string_check(op: str, text: str, answer: str, score: float) -> None:
    grader = build_grader(check(op, "{{sample.output_text}}"))
    result = grader.grade(sample_of(text), {"answer": answer})
    assert (result.score, result.sub_scores) == (score, {"check": score})
    assert grader.references() == {"answer"}


@pytest.mark.parametrize(
    "metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"]
)
def test_text_similarity_is_one_for_the_same_text_and_lower_for_another(metric: str) -> None:
    grader = build_grader(similarity(metric))
    reference = "the quick brown fox jumps over the lazy dog"
    same = grader.grade(sample_of(reference), {"answer": reference}).score
    near = grader.grade(sample_of("the quick brown fox jumps over the lazy cat"), {"answer": reference}).score
    other = grader.grade(sample_of("completely unrelated words here"), {"answer": reference}).score
    assert same == pytest.approx(1.0)
    assert 1.0 > near > other >= 0.0


def test_fuzzy_match_is_rapidfuzz_ratio() -> None:
    assert build_grader(similarity("fuzzy_match")).grade(sample_of("kitten"), {"answer": "sitting"}).score == (
        pytest.approx(1 - 5 / 13)
    )


def test_unsupported_or_unknown_metrics_are_refused() -> None:
    with pytest.raises(GraderError, match="WordNet") as caught:
        build_grader(similarity("meteor"))
    assert caught.value.param == "grader.evaluation_metric"
    with pytest.raises(GraderError, match="embedding model"):
        build_grader(similarity("cosine"))  # no model client: nothing to embed with
    with pytest.raises(GraderError) as caught:
        build_grader(similarity("bertscore"))
    assert caught.value.param == "grader.evaluation_metric"


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ({"type": "label_model", "name": "x"}, "grader.type"),
        ({"name": "x"}, "grader.type"),
        ({**check("eq", "a"), "operation": "contains"}, "grader.operation"),
        ({**check("eq", "a"), "pass_threshold": 0.5}, "grader.pass_threshold"),
        ({"type": "score_model", "name": "j", "model": "m", "input": [], "range": [0, 1]}, "grader.input"),
        (
            {
                "type": "score_model",
                "name": "j",
                "model": "m",
                "input": [{"role": "user", "content": "x"}],
                "range": [1, 0],
            },
            "grader",
        ),
        ({"type": "python", "name": "p", "source": "def grade(s, i): return 1", "image_tag": "x"}, "grader.image_tag"),
    ],
)
def test_bad_grader_objects_name_the_field(spec: dict, param: str) -> None:
    with pytest.raises(GraderError) as caught:
        build_grader(spec)
    assert caught.value.param == param


def multi(formula: str) -> dict:
    return {
        "type": "multi",
        "name": "both",
        "graders": {"exact": check("eq", "{{sample.output_text}}"), "close": similarity("fuzzy_match")},
        "calculate_output": formula,
    }


def test_multi_combines_named_scores_by_the_formula() -> None:
    grader = build_grader(multi("0.5 * exact + 0.5 * close^2"))
    result = grader.grade(sample_of("kitten"), {"answer": "sitting"})
    close = 1 - 5 / 13
    assert result.sub_scores == {"exact": 0.0, "close": pytest.approx(close)}
    assert result.score == pytest.approx(0.5 * close**2)
    assert grader.references() == {"answer"}
    formula = "max(exact, close) - min(exact, abs(-close)) + floor(1.5) + ceil(0.2) + sqrt(4) + exp(0) + log(1)"
    result = build_grader(multi(formula)).grade(sample_of("sitting"), {"answer": "sitting"})
    assert result.score == pytest.approx(1 - 1 + 1 + 1 + 2 + 1 + 0)


@pytest.mark.parametrize(
    "formula",
    [
        "exact + missing",
        "__import__('os').system('true')",
        "exact.__class__",
        "exact if close else 1",
        "'a' * 3",
        "exact +",
    ],
)
def test_multi_refuses_formulas_that_are_not_arithmetic_over_its_graders(formula: str) -> None:
    with pytest.raises(GraderError) as caught:
        build_grader(multi(formula))
    assert caught.value.param == "grader.calculate_output"


def test_multi_in_the_sdks_shape_and_its_errors_point_inside() -> None:
    spec = {
        "type": "multi",
        "name": "m",
        "graders": check("eq", "{{sample.output_text}}", "x"),
        "calculate_output": "check",
    }
    assert build_grader(spec).grade(sample_of("x"), {}).sub_scores == {"check": 1.0}
    bad = multi("exact")
    bad["graders"]["exact"]["operation"] = "is"
    with pytest.raises(GraderError) as caught:
        build_grader(bad)
    assert caught.value.param == "grader.graders.exact.operation"
    assert parse(multi("exact")).type == "multi"


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ('{"result": 0.7, "steps": []}', 0.7),
        ('{"score": 3}', 1.0),
        ("0.25", 0.25),
        ("I'd give it 0.4 out of 1.", 0.4),
        ("Score: -2", 0.0),
        ("1e-1", 0.1),
    ],
)
def test_a_judges_reply_is_parsed_and_clamped(reply: str, score: float) -> None:
    assert parse_score(reply, 0.0, 1.0) == pytest.approx(score)


def test_a_judges_reply_without_a_number_fails_clearly() -> None:
    with pytest.raises(GradingFailed, match="no number") as caught:
        parse_score("excellent!", 0, 1)
    assert caught.value.error == "model_grader_parse_error"


def test_score_model_needs_reachable_models() -> None:
    spec = {"type": "score_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "{{item.q}}"}]}
    with pytest.raises(GraderError) as caught:
        build_grader(spec)
    assert caught.value.param == "grader.model"


sandboxed = pytest.mark.skipif(unavailable() is not None, reason=f"no sandbox here: {unavailable()}")


def python_grader(source: str, **limits: float) -> PythonGrader:
    spec = parse({"type": "python", "name": "py", "source": source})
    return PythonGrader(spec, "grader", Limits(**limits) if limits else None)  # type: ignore[arg-type]


@sandboxed
def test_python_grader_grades_in_a_process_without_network_or_the_services_files(tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("key")
    source = f"""
import os, socket
def grade(sample, item):
    print("my own output does not confuse the result")
    try:
        socket.create_connection(("127.0.0.1", 22), timeout=1)
        net = 1
    except OSError:
        net = 0
    visible = os.path.exists({str(secret)!r})
    keys = [k for k in os.environ if k.startswith("BENTOSERVICE") or "KEY" in k]
    return (sample["output_text"] == item["answer"]) + 10 * net + 100 * visible + 1000 * len(keys)
"""
    grader = python_grader(source)
    assert grader.grade(sample_of("4"), {"answer": "4"}).score == 1.0
    assert grader.grade(sample_of("5"), {"answer": "4"}).score == 0.0


@sandboxed
def test_python_grader_that_fails_to_import_is_refused_at_validation() -> None:
    with pytest.raises(GraderError, match="No module named 'no_such_module'") as caught:
        build_grader({"type": "python", "name": "p", "source": "import no_such_module\ndef grade(s, i): return 1"})
    assert caught.value.param == "grader.source"
    with pytest.raises(GraderError, match="no function grade"):
        build_grader({"type": "python", "name": "p", "source": "x = 1"})


@sandboxed
def test_python_grader_limits_stop_runaway_code() -> None:
    spinning = python_grader("def grade(s, i):\n    while True: pass", cpu_seconds=1, wall_seconds=20)
    with pytest.raises(GradingFailed, match="CPU") as caught:
        spinning.grade(sample_of("x"), {})
    assert caught.value.error == "python_grader_runtime_error"
    sleeping = python_grader("import time\ndef grade(s, i):\n    time.sleep(30)", wall_seconds=1)
    with pytest.raises(GradingFailed, match="longer than 1 s") as caught:
        sleeping.grade(sample_of("x"), {})
    assert caught.value.error == "unresponsive_reward_error"
    hungry = python_grader("def grade(s, i):\n    return len(bytearray(2 << 30))", memory_mb=256)
    with pytest.raises(GradingFailed, match="MemoryError"):
        hungry.grade(sample_of("x"), {})
    raising = python_grader("def grade(s, i):\n    return 1 / 0")
    with pytest.raises(GradingFailed, match="ZeroDivisionError"):
        raising.grade(sample_of("x"), {})
