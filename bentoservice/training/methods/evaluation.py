"""The before/after evaluation at the end of a fine-tune: held-out loss of the base and of the adapter, and a
side-by-side sample of greedy generations (prompt, base, adapter, reference).

It runs in the training process on the model just trained, the adapter switched off for the base's figures:
the server's engine may not be reachable from there (a Ray worker), and this model is the adapter as stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer

    from bentoservice.training.data import formats

log = logging.getLogger(__name__)


class Evaluation(BaseModel):
    """A job's `evaluation` block: the prompts to generate from (the validation file's when unset)."""

    model_config = ConfigDict(extra="forbid")
    prompts_file: str | None = None
    max_tokens: int = Field(64, gt=0)
    samples: int = Field(5, gt=0)


def _prompt_and_reference(row: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    """A canonical row as a prompt and the reply it expects: an SFT chat up to its last assistant turn, a
    preference pair's prompt and its chosen reply."""
    if "messages" in row:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        return messages[:last], messages[last]["content"] if last < len(messages) else None
    return row["prompt"], row["chosen"][-1]["content"]


def _generate(
    trainer: Trainer, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict[str, str]]], max_tokens: int
) -> list[str]:
    import torch

    model, replies = trainer.model, []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return replies


# A trainer's evaluation keys and the summary's names for them: the loss, an LLM's token accuracy, DPO's and ORPO's
# preference accuracy, a rerank or embedding model's accuracy and MRR (methods.encoders).
HELD_OUT_FIGURES = {
    "eval_loss": "loss",
    "eval_mean_token_accuracy": "mean_token_accuracy",
    "eval_rewards/accuracies": "preference_accuracy",
    "eval_accuracy": "accuracy",
    "eval_mrr": "mrr",
}


def held_out(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(metrics[key]) for key, name in HELD_OUT_FIGURES.items() if metrics.get(key) is not None}


def before_after(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    test: formats.Dataset | None,
    prompts: formats.Dataset | None,
    settings: Evaluation,
    after: dict[str, Any],
) -> dict[str, Any]:
    """The summary: held-out figures of the base and the adapter (`after`: the trainer's final evaluation) and
    the sample table."""
    model = trainer.model
    model.eval()
    # The training's padding-free attention takes packed rows, not generation's cache.
    model.get_base_model().set_attn_implementation("sdpa")
    summary: dict[str, Any] = {}
    if test is not None:
        with model.disable_adapter():
            base = held_out(trainer.evaluate(metric_key_prefix="eval"))
        summary.update(base=base, adapter=held_out(after))
    source = prompts or test
    rows = source.rows[: settings.samples] if source is not None else []
    pairs = [_prompt_and_reference(row) for row in rows]
    chats = [messages for messages, _ in pairs]
    with model.disable_adapter():
        base_replies = _generate(trainer, tokenizer, chats, settings.max_tokens)
    adapter_replies = _generate(trainer, tokenizer, chats, settings.max_tokens)
    summary["samples"] = [
        {"prompt": messages[-1]["content"] if messages else "", "base": b, "adapter": a, "reference": reference}
        for (messages, reference), b, a in zip(pairs, base_replies, adapter_replies, strict=True)
    ]
    log.info("evaluation: %s", {k: v for k, v in summary.items() if k != "samples"})
    return summary
