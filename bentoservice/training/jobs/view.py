"""A job for a person: its summary with the before/after evaluation as tables (rich), and a progress bar that
follows its events (tqdm.auto: a terminal bar, or a widget in a notebook). No torch: the client and the CLI use it."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm


class StepBar:
    """Steps done of the job's total (known from its first metrics event), the latest training loss, and tqdm's
    ETA from the step rate it sees."""

    def __init__(self, job_id: str, disable: bool = False) -> None:
        self.bar = tqdm(desc=job_id, unit="step", total=None, disable=disable)
        self.step = 0
        self.total: int | None = None

    def update(self, events: list[dict[str, Any]]) -> None:
        """`events`: the job's new events, oldest first."""
        for event in events:
            data = event.get("data") or {}
            if event.get("type") != "metrics" or "step" not in data:
                continue
            if data.get("total_steps"):
                self.total = self.bar.total = int(data["total_steps"])
            self.step = max(self.step, int(data["step"]))
            if "loss" in data:
                self.bar.set_postfix(loss=f"{data['loss']:.4f}", refresh=False)
        self.bar.n = self.step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def steps(self) -> str:
        return f"{self.step}/{self.total}" if self.total else str(self.step)


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def held_out_table(evaluation: dict[str, Any]) -> Table | None:
    """Each held-out figure (loss, token accuracy, and the method's own: preference accuracy, a rerank's accuracy
    and MRR) of the base and of the fine-tune; None without a validation file."""
    base, adapter = evaluation.get("base") or {}, evaluation.get("adapter") or {}
    names = [*base, *(name for name in adapter if name not in base)]
    if not names:
        return None
    table = Table(title="Held-out figures (validation file)")
    for column in ("figure", "base", "fine-tuned", "change"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for name in names:
        before, after = base.get(name), adapter.get(name)
        change = f"{after - before:+.4f}" if isinstance(before, float) and isinstance(after, float) else "-"
        table.add_row(name, _figure(before), _figure(after), change)
    return table


def samples_table(evaluation: dict[str, Any]) -> Table | None:
    """The samples side by side: prompt, base, fine-tuned, reference (an LLM's greedy generations; a rerank or
    embedding model's top passage for a query, the positive as reference)."""
    samples = evaluation.get("samples") or []
    if not samples:
        return None
    ranking = evaluation.get("method") in ("rerank", "embedding")
    title = "Top-ranked passages, side by side" if ranking else "Greedy generations, side by side"
    table = Table(title=title, show_lines=True)
    for column in (
        ("query", "base", "fine-tuned", "positive") if ranking else ("prompt", "base", "fine-tuned", "reference")
    ):
        table.add_column(column, overflow="fold")
    for sample in samples:
        table.add_row(sample["prompt"], sample["base"], sample["adapter"], sample.get("reference") or "-")
    return table


def print_job(job: dict[str, Any], console: Console | None = None) -> None:
    """The job's status, model, result files and, once it has one, its before/after evaluation."""
    console = console or Console()
    console.print(f"[bold]{job['id']}[/bold]  {job['status']}  {job['model']} -> {job.get('fine_tuned_model') or '-'}")
    if job.get("trained_tokens"):
        console.print(f"trained tokens: {job['trained_tokens']}")
    if job.get("error") and job["error"].get("message"):
        console.print(f"[red]error:[/red] {job['error']['message']}")
    if job.get("result_files"):
        console.print(f"result files: {', '.join(job['result_files'])}")
    for integration in job.get("integrations") or []:
        block = integration.get(integration["type"]) or {}
        console.print(f"{integration['type']} run folder: {block.get('dir', '-')}")
    evaluation = job.get("evaluation")
    if not evaluation:
        return
    for table in (held_out_table(evaluation), samples_table(evaluation)):
        if table is not None:
            console.print(table)
