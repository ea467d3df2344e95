"""A job for a person: the progress bar's steps and the evaluation's tables (training.jobs.view)."""

from __future__ import annotations

from rich.console import Console

from bentoservice.training.jobs.view import StepBar, held_out_table, samples_table


def test_bar_counts_to_the_total_of_the_metrics_events() -> None:
    bar = StepBar("ftjob-x", disable=True)
    bar.update([{"type": "message", "data": {}}, {"type": "metrics", "data": {"step": 1, "loss": 2.5}}])
    assert (bar.step, bar.total, bar.steps()) == (1, None, "1")
    bar.update(
        [
            {"type": "metrics", "data": {"step": 3, "total_steps": 4, "loss": 1.5}},
            {"type": "metrics", "data": {"step": 2, "eval_loss": 1.9}},  # a validation of an earlier step
        ]
    )
    assert (bar.bar.n, bar.bar.total, bar.steps()) == (3, 4, "3/4")
    bar.close()


def _render(evaluation: dict) -> tuple[str, dict[str, list[str]]]:
    """The two tables as text, and the held-out table's rows by figure."""
    console = Console(width=120, record=True)
    for table in (held_out_table(evaluation), samples_table(evaluation)):
        console.print(table)
    text = console.export_text()
    return text, {line.split()[1]: line.split()[2:] for line in text.splitlines() if line.startswith("│")}


def test_tables_show_before_after_and_the_samples() -> None:
    evaluation = {
        "base": {"loss": 2.0, "mean_token_accuracy": 0.25},
        "adapter": {"loss": 1.5, "mean_token_accuracy": 0.5, "preference_accuracy": 0.75},
        "samples": [{"prompt": "Hi?", "base": "Hello.", "adapter": "Arr, hello!", "reference": None}],
    }
    text, rows = _render(evaluation)
    assert rows["loss"] == ["│", "2.0000", "│", "1.5000", "│", "-0.5000", "│"]
    assert rows["preference_accuracy"][:4] == ["│", "-", "│", "0.7500"]
    assert "Arr, hello!" in text and "Hello." in text
    assert held_out_table({"samples": []}) is None and samples_table({}) is None


def test_a_rerank_evaluation_shows_mrr_and_the_top_passages() -> None:
    evaluation = {
        "method": "rerank",
        "base": {"loss": 1.39, "accuracy": 0.25, "mrr": 0.5},
        "adapter": {"loss": 0.9, "accuracy": 1.0, "mrr": 1.0},
        "samples": [{"prompt": "Where?", "base": "Oslo.", "adapter": "Lima.", "reference": "Lima."}],
    }
    text, rows = _render(evaluation)
    assert rows["mrr"] == ["│", "0.5000", "│", "1.0000", "│", "+0.5000", "│"]
    assert "Top-ranked passages" in text and "positive" in text and "Oslo." in text
