"""AutoLLM: the Python fine-tuning API, as OpenLLM's design proposed it.

llm = bentoservice.AutoLLM.for_model("smollm2", model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
llm.prepare_for_training(adapter_type="lora", r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
result = llm.tuning(train_dataset=rows, args=dict(max_steps=50, learning_rate=3e-4))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bentoservice import store
from bentoservice.training import hardware
from bentoservice.training.config import AdapterType, Method, TrainingConfig
from bentoservice.training.jobs.callbacks import Sink, StopFlag
from bentoservice.training.methods.trainers import KIND, TrainingResult, resolve_base, to_dataset, train_on

if TYPE_CHECKING:
    from bentoservice.training.methods.trainers import TrainData

LORA_OPTIONS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "bias"})


class AutoLLM:
    """A stored base model to fine-tune with LoRA."""

    def __init__(self, base: store.StoredModel) -> None:
        self.base = base
        self.adapter: dict[str, Any] = {}

    @classmethod
    def for_model(cls, model: str, model_id: str | None = None) -> AutoLLM:
        """`model` is a store name or hub id; the model is imported into the store when a card knows it."""
        return cls(resolve_base(model, model_id))

    def prepare_for_training(self, adapter_type: AdapterType = "lora", **lora: Any) -> AutoLLM:
        """Choose the adapter: `lora` or `qlora` (4-bit base, CUDA only) and LoRA's r, lora_alpha,
        lora_dropout, target_modules and bias. Without this call the defaults apply."""
        unknown = set(lora) - LORA_OPTIONS
        if unknown:
            raise TypeError(f"unknown LoRA option(s): {', '.join(sorted(unknown))}")
        settings = {"adapter_type": adapter_type, **lora}
        TrainingConfig(model=self.base.name, **settings)  # validates the values
        hardware.check_adapter_type(adapter_type, hardware.detect_device())
        self.adapter = settings
        return self

    def tuning(
        self,
        train_dataset: TrainData,
        eval_dataset: TrainData | None = None,
        *,
        method: Method = "sft",
        args: dict[str, Any] | None = None,
        sink: Sink | None = None,
        stop: StopFlag | None = None,
        resume: bool = False,
        **options: Any,
    ) -> TrainingResult:
        """Fine-tune on `train_dataset` (a file path, a `datasets.Dataset` or a list of rows).

        `args` takes any TrainingArguments field (output_dir overrides the default folder); `options` are
        the other TrainingConfig fields: adapter_name, beta, loss_type, packing, max_seq_length.
        """
        config = TrainingConfig(model=self.base.name, method=method, args=args or {}, **self.adapter, **options)
        kind = KIND[method]
        test = to_dataset(eval_dataset, kind) if eval_dataset is not None else None
        return train_on(config, to_dataset(train_dataset, kind), test, sink=sink, stop=stop, resume=resume)
