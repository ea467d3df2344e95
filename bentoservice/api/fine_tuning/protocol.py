"""The wire format of a fine-tuning job's body: OpenAI's fields, OpenWeights' flat fields and OPEA's blocks, side
by side in one pydantic model (dialects.py turns it into a job's config)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bentoservice.config import get_settings

Auto = Literal["auto"]


# OpenAI's ranges for its hyperparameters.
Epochs = Annotated[int, Field(ge=1, le=50)]
BatchSize = Annotated[int, Field(ge=1, le=256)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
# transformers.set_seed seeds numpy too, which takes 0..2**32-1.
JobSeed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# An adapter of a higher rank could not be served here (BENTOSERVICE_MAX_LORA_RANK).
Rank = Annotated[int, Field(gt=0, le=get_settings().max_lora_rank)]


class Hyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters (also the job's top-level `hyperparameters`, OpenAI's older form)."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: Epochs | Auto | None = None
    batch_size: BatchSize | Auto | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=10)] | Auto | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Annotated[float, Field(gt=0, le=100)] | Auto | None = None


class SupervisedBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Hyperparameters()


class DpoBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class ReinforcementHyperparameters(BaseModel):
    """OpenAI's reinforcement hyperparameters (training.methods.rl says what each becomes)."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: Epochs | Auto | None = None
    batch_size: BatchSize | Auto | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=10)] | Auto | None = None
    compute_multiplier: Annotated[float, Field(gt=0, le=16)] | Auto | None = None
    eval_interval: Annotated[int, Field(ge=1, le=10_000)] | Auto | None = None
    eval_samples: Annotated[int, Field(ge=1, le=64)] | Auto | None = None
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None


class ReinforcementBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]
    """Checked by training.graders.build_grader when the job is created."""
    response_format: dict[str, Any] | None = None
    hyperparameters: ReinforcementHyperparameters = ReinforcementHyperparameters()


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedBlock | None = None
    dpo: DpoBlock | None = None
    reinforcement: ReinforcementBlock | None = None


# OPEA's fields (GenAIComps' finetune_config.py) that this server does not act on, with OPEA's defaults, by block: a
# body may carry them at those values (an OPEA client sends its whole config); any other value, or a key OPEA does not
# have either, is a 400 naming it (api.fine_tuning.dialects).
OPEA_DEFAULTS: dict[str, dict[str, Any]] = {
    "General": {
        "base_model": None,
        "tokenizer_name": None,
        "gaudi_config_name": None,
        "gpt_base_model": False,
        "output_dir": "./tmp",
        "report_to": "none",
        "resume_from_checkpoint": None,
        "save_strategy": "no",
        "config": {"trust_remote_code": False, "token": None},
        "xtune_config": {
            "tool": "",
            "trainer": "",
            "model": "",
            "config_file": "",
            "dataset": "",
            "dataset_root": "",
            "device": "",
        },
        "enable_gradient_checkpointing": False,
    },
    "General.lora_config": {"task_type": "CAUSAL_LM"},
    "Dataset": {
        "train_file": None,
        "validation_file": None,
        "validation_split_percentage": 5,
        "group": True,
        "block_size": 512,
        "shuffle": False,
        "max_source_length": 384,
        "max_prompt_length": 512,
        "padding_side": "right",
        "truncation_side": "right",
        "max_seq_length": 512,
        "truncation": True,
        "padding": True,
        "pad_to_max": False,
        "mask_input": True,
        "mask_response": True,
        "data_preprocess_type": "neural_chat",
        "max_train_samples": 0,
        "max_eval_samples": 0,
        "reasoning_dataset_keys": ["Question", "Complex_CoT", "Response"],
    },
    "Training": {
        "optimizer": "adamw_torch",
        "device": "cpu",
        "hpu_execution_mode": "lazy",
        "num_training_workers": 1,
        "resources_per_worker": {"CPU": 32, "GPU": 0, "HPU": 0},
        "accelerate_mode": "DDP",
        "mixed_precision": "no",
        "deepspeed_config_file": "",
    },
    "Training.embedding_training_config": {
        "negatives_cross_device": False,
        "sentence_pooling_method": "cls",
        "normalized": True,
        "use_inbatch_neg": True,
    },
}


class LoraBlock(BaseModel):
    """OPEA's General.lora_config."""

    model_config = ConfigDict(extra="allow")  # OPEA's other fields: checked against OPEA_DEFAULTS
    r: Rank | None = None
    lora_alpha: int | None = Field(None, gt=0)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | str | None = None


class GeneralBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # OPEA's other fields: checked against OPEA_DEFAULTS
    task: str = "instruction_tuning"
    lora_config: LoraBlock | None = LoraBlock()


class DatasetBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # OPEA's other fields: checked against OPEA_DEFAULTS
    max_length: int | None = Field(None, gt=0)
    # Rerank and embedding tasks (FlagEmbedding's names).
    train_group_size: int | None = Field(None, ge=2)
    query_max_len: int | None = Field(None, gt=0)
    passage_max_len: int | None = Field(None, gt=0)
    query_instruction_for_retrieval: str | None = None
    passage_instruction_for_retrieval: str | None = None


class EmbeddingTrainingBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # OPEA's other fields: checked against OPEA_DEFAULTS
    temperature: float | None = Field(None, gt=0)


class TrainingBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # OPEA's other fields: checked against OPEA_DEFAULTS
    epochs: Epochs | None = None
    batch_size: BatchSize | None = None
    learning_rate: LearningRate | None = None
    max_train_steps: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int | None = Field(None, gt=0)
    logging_steps: int | None = Field(None, gt=0)
    lr_scheduler: str | None = None
    weight_decay: float | None = Field(None, ge=0)
    dpo_beta: float | None = Field(None, gt=0)
    embedding_training_config: EmbeddingTrainingBlock | None = None


class WandbBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Field(min_length=1)
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None


class WandbIntegration(BaseModel):
    """OpenAI's integrations entry; the run is logged through TRL's report_to (offline unless WANDB_MODE says)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb"]
    wandb: WandbBlock


class TrackioBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Field(min_length=1)
    name: str | None = None


class TrackioIntegration(BaseModel):
    """Beyond OpenAI: trackio, a local alternative to wandb (its runs in a SQLite file under the job's folder)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["trackio"]
    trackio: TrackioBlock


Integration = Annotated[WandbIntegration | TrackioIntegration, Field(discriminator="type")]


class EvaluationBlock(BaseModel):
    """The before/after evaluation at the end of a job (on by default when there is a validation file)."""

    model_config = ConfigDict(extra="forbid")
    prompts_file: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    samples: int | None = Field(None, gt=0)


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: JobSeed | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Integration] | None = Field(None, max_length=1)
    evaluation: EvaluationBlock | None = None
    # OpenWeights' names.
    loss: Literal["sft", "dpo", "orpo"] | None = None
    epochs: Epochs | None = None
    learning_rate: LearningRate | None = None
    beta: float | None = Field(None, gt=0)
    r: Rank | None = None
    lora_alpha: int | None = Field(None, gt=0)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | str | None = None
    max_seq_length: int | None = Field(None, gt=0)
    per_device_train_batch_size: BatchSize | None = None
    gradient_accumulation_steps: int | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)
    max_steps: int | None = Field(None, gt=0)
    save_steps: int | None = Field(None, gt=0)
    logging_steps: int | None = Field(None, gt=0)
    test_file: str | None = None
    merge_before_push: bool = False
    load_in_4bit: bool = False  # QLoRA: the base in 4-bit NF4 through bitsandbytes (CUDA), as in OpenWeights
    lora_bias: Literal["all", "none"] | None = None
    use_rslora: bool = False
    optim: Literal["adamw", "adamw_8bit", "adam", "sgd"] | None = None
    weight_decay: float | None = Field(None, ge=0)
    lr_scheduler_type: str | None = None
    eval_batch_size: BatchSize | None = None
    test_file_eval_steps: int | float | None = Field(None, gt=0)
    test_file_eval_strategy: Literal["no", "steps", "epoch"] | None = None
    packing: bool | None = None
    max_completion_tokens: int | None = Field(None, gt=0, le=8192)  # reinforcement: a sampled completion's tokens
    is_peft: bool = True
    train_on_responses_only: bool = True
    chat_template: str = "default"
    meta: dict[str, Any] | None = None  # shown in the job's `params`
    # OpenWeights pushes to the Hugging Face hub; here a model stays in this server's store.
    finetuned_model_id: str | None = None
    push_to_private: bool | None = None
    # Scaling out (training.backends): where the job trains, over how many data-parallel worker processes.
    backend: Literal["local", "ray"] | None = None
    num_workers: int | None = Field(None, ge=1, le=1024)
    gpus_per_worker: float | None = Field(None, ge=0)
    distributed: Literal["ddp", "fsdp", "deepspeed"] | None = None
    # OPEA's blocks.
    General: GeneralBlock | None = None
    Dataset: DatasetBlock | None = None
    Training: TrainingBlock | None = None


class JobRef(BaseModel):
    fine_tuning_job_id: str
