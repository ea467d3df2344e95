"""A fine-tuning job body in each dialect (OpenAI, OpenWeights, OPEA) becomes the same kind of job config."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from pydantic import ValidationError

from bentoservice.api.errors import APIError
from bentoservice.api.fine_tuning.dialects import default_learning_rate, job_config, training_method
from bentoservice.api.fine_tuning.protocol import JobRequest
from bentoservice.training.config import LORA_LEARNING_RATE

TRAIN = {"id": "file-train"}


def config(**body: Any) -> dict[str, Any]:
    request = JobRequest.model_validate({"model": "tiny", "training_file": "file-train", **body})
    return job_config(request, "ftjob-abc123", "tiny", TRAIN, None, training_method(request))


def test_openai_body() -> None:
    made = config(hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}, seed=7)
    assert made["method"] == "sft" and made["model"] == "tiny" and made["adapter_name"] == "ft-abc123"
    assert made["train_file"].endswith("file-train") and "test_file" not in made
    args = made["args"]
    assert (args["num_train_epochs"], args["per_device_train_batch_size"], args["seed"]) == (2, 8, 7)
    assert args["learning_rate"] == pytest.approx(LORA_LEARNING_RATE["sft"] * 0.5)
    assert made["scale"] == {"backend": "local", "num_workers": 1, "gpus_per_worker": None, "distributed": "ddp"}


def test_openai_dpo_method_block() -> None:
    made = config(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": "auto"}}})
    assert made["method"] == "dpo" and made["beta"] == 0.2
    assert made["args"]["num_train_epochs"] == 3  # "auto": the default
    assert made["args"]["learning_rate"] == LORA_LEARNING_RATE["dpo"]


def test_openweights_flat_fields() -> None:
    made = config(
        loss="orpo",
        epochs=1,
        learning_rate=1e-4,
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj"],
        max_seq_length=256,
        max_steps=5,
    )
    assert made["method"] == "orpo"
    assert (made["r"], made["lora_alpha"], made["lora_dropout"], made["target_modules"]) == (8, 16, 0.0, ["q_proj"])
    assert made["max_seq_length"] == 256
    assert made["args"]["learning_rate"] == 1e-4 and made["args"]["max_steps"] == 5


def test_opea_blocks() -> None:
    made = config(
        General={"task": "instruction_tuning", "lora_config": {"r": 4, "lora_alpha": 8}},
        Dataset={"max_length": 128},
        Training={"epochs": 2, "learning_rate": 3e-4, "max_train_steps": 9},
    )
    assert made["method"] == "sft" and (made["r"], made["lora_alpha"]) == (4, 8)
    assert made["max_seq_length"] == 128
    assert (made["args"]["num_train_epochs"], made["args"]["learning_rate"], made["args"]["max_steps"]) == (2, 3e-4, 9)


def test_top_level_lora_fields_win_over_opea_block() -> None:
    made = config(r=32, General={"lora_config": {"r": 4, "lora_alpha": 8}})
    assert (made["r"], made["lora_alpha"]) == (32, 8)


def test_rerank_task_trains_in_full_unless_lora_is_given() -> None:
    full = config(General={"task": "rerank"}, Dataset={"train_group_size": 4})
    assert full["method"] == "rerank" and "lora" not in full and full["group_size"] == 4
    lora = config(General={"task": "rerank", "lora_config": {"r": 4}})
    assert lora["lora"] == {"r": 4}
    assert default_learning_rate(full) != default_learning_rate(lora)


def test_unknown_task_is_refused_naming_the_field() -> None:
    with pytest.raises(APIError) as info:
        config(General={"task": "pretraining"})
    assert (info.value.status, info.value.param) == (400, "General.task")


def test_full_fine_tuning_of_an_llm_is_refused() -> None:
    with pytest.raises(APIError) as info:
        config(General={"lora_config": None})
    assert info.value.param == "General.lora_config"


def test_encoder_jobs_train_in_one_process() -> None:
    with pytest.raises(APIError) as info:
        config(General={"task": "embedding"}, num_workers=2)
    assert info.value.param == "num_workers"


def test_unknown_body_field_is_refused() -> None:
    with pytest.raises(ValueError, match="learning_rate_schedule"):
        JobRequest.model_validate({"model": "tiny", "training_file": "f", "learning_rate_schedule": "cosine"})


def test_validation_without_save_steps_evaluates_each_epoch_with_no_unset_values() -> None:
    request = JobRequest.model_validate({"model": "tiny", "training_file": "file-train", "validation_file": "v"})
    made = job_config(request, "ftjob-abc123", "tiny", TRAIN, {"id": "v"}, training_method(request))
    assert made["args"]["eval_strategy"] == made["args"]["save_strategy"] == "epoch"
    assert None not in made["args"].values()  # the adapter's store metadata refuses None


@pytest.mark.parametrize(
    ("method", "param"),
    [
        (
            {"type": "supervised", "supervised": {"hyperparameters": {"foo": 1}}},
            "method.supervised.hyperparameters.foo",
        ),
        (
            {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}},
            "method.supervised.hyperparameters.beta",
        ),
        ({"type": "dpo", "dpo": {"hyperparameters": {"n_epoch": 2}}}, "method.dpo.hyperparameters.n_epoch"),
        ({"type": "dpo", "dpo": {"hyperparameter": {}}}, "method.dpo.hyperparameter"),
        ({"type": "supervised", "rerank": {}}, "method.rerank"),
        (
            {"type": "reinforcement", "reinforcement": {"grader": {}, "hyperparameters": {"foo": 1}}},
            "method.reinforcement.hyperparameters.foo",
        ),
    ],
)
def test_unknown_method_keys_are_refused_naming_them(method: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate({"model": "tiny", "training_file": "f", "method": method})
    assert ".".join(str(p) for p in info.value.errors()[0]["loc"]) == param


def test_unknown_top_level_hyperparameter_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate({"model": "tiny", "training_file": "f", "hyperparameters": {"n_epochz": 2}})
    assert info.value.errors()[0]["loc"] == ("hyperparameters", "n_epochz")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.2}}}}, "method.dpo"),
        ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
        ({"loss": "sft", "method": {"type": "dpo"}}, "loss"),
    ],
)
def test_a_method_block_that_would_be_dropped_is_refused(body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        config(**body)
    assert (info.value.status, info.value.param) == (400, param)


def test_orpo_takes_the_dpo_block() -> None:
    made = config(loss="orpo", method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}})
    assert made["method"] == "orpo" and made["beta"] == 0.3


def test_a_rerank_job_with_validation_is_evaluated_by_default() -> None:
    request = JobRequest.model_validate(
        {"model": "minilm", "training_file": "t", "validation_file": "v", "General": {"task": "rerank"}}
    )
    made = job_config(request, "ftjob-abc123", "minilm", TRAIN, {"id": "v"}, training_method(request))
    assert made["evaluation"] == {"prompts_file": None}


def test_an_evaluation_with_nothing_to_compare_is_refused() -> None:
    for body in ({"General": {"task": "rerank"}, "evaluation": {}}, {"evaluation": {"samples": 2}}):
        with pytest.raises(APIError) as info:
            config(**body)
        assert info.value.param == "evaluation"


def test_opea_fields_at_their_defaults_pass_and_others_are_refused() -> None:
    whole = config(
        General={"task": "rerank", "output_dir": "./tmp", "lora_config": {"r": 4, "task_type": "CAUSAL_LM"}},
        Dataset={"train_group_size": 4, "mask_input": True, "padding_side": "right"},
        Training={"epochs": 2, "device": "cpu", "embedding_training_config": {"temperature": 0.05, "normalized": True}},
    )
    assert whole["group_size"] == 4 and whole["args"]["num_train_epochs"] == 2
    for body, param in (
        ({"Training": {"epoch": 2}}, "Training.epoch"),  # a typo of epochs
        ({"Dataset": {"mask_input": False}}, "Dataset.mask_input"),  # OPEA's field, not at its default
        ({"General": {"lora_config": {"r": 4, "task": "x"}}}, "General.lora_config.task"),
        (
            {"Training": {"embedding_training_config": {"normalized": False}}},
            "Training.embedding_training_config.normalized",
        ),
    ):
        with pytest.raises(APIError) as info:
            config(**body)
        assert (info.value.status, info.value.param) == (400, param)


@pytest.mark.parametrize(
    "integration",
    [{"type": "wandb", "wandb": {"project": "p"}}, {"type": "trackio", "trackio": {"project": "p"}}],
    ids=["wandb", "trackio"],
)
def test_an_integration_whose_package_is_missing_is_a_400(integration: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules is how Python marks a module as not importable: find_spec answers None, as when it is
    # not installed.
    monkeypatch.setitem(sys.modules, integration["type"], None)
    with pytest.raises(APIError) as info:
        config(integrations=[integration])
    assert (info.value.status, info.value.param, info.value.code) == (400, "integrations", "integration_unavailable")
    assert f"needs {integration['type']}" in info.value.message
