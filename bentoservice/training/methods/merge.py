"""Merge a LoRA adapter into its base: a new base model in the store (FastChat's apply_lora)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from bentoservice import store

log = logging.getLogger(__name__)


def merge_adapter(base: str, lora: str, target: str) -> store.StoredModel:
    """Merge `lora` (a PEFT folder, store tag or hub id) into `base` and store it as `target`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stored = store.resolve_base(base)
    source = store.adapter_source(lora)
    if source.base is not None and source.base != stored.name:
        raise store.StoreError(f"the adapter {lora!r} was made for {source.base!r}, not {stored.name!r}")
    log.info("merging %s into %s", lora, stored.tag)
    model = AutoModelForCausalLM.from_pretrained(stored.path, dtype="auto")
    merged = PeftModel.from_pretrained(model, source.folder).merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(stored.path).save_pretrained(tmp)
        return store.save_merged(target, Path(tmp), stored, lora)
