"""Model cards: one YAML file per supported base model (hub id, architecture, LoRA targets, chat template, offline
source), shipped inside the package (`model_cards/`) and read with importlib.resources, so that a wheel install
has them."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

CARDS_PACKAGE = "bentoservice.store.model_cards"


@dataclass(frozen=True)
class Card:
    name: str
    model_id: str
    architecture: str
    lora_target_modules: list[str]
    chat_template: str | None = None
    source: dict[str, str] | None = None
    tool_format: str | None = None
    """How tool calls read in the model's text (engine/tool_parsers.py: `hermes`); None: no tool calling."""


def cards() -> dict[str, Card]:
    found = {}
    files = [f for f in resources.files(CARDS_PACKAGE).iterdir() if f.name.endswith(".yaml")]
    for file in sorted(files, key=lambda f: f.name):
        data = yaml.safe_load(file.read_text())
        found[data["name"]] = Card(**data)
    return found


def card_for(name_or_id: str) -> Card | None:
    for card in cards().values():
        if name_or_id in (card.name, card.model_id):
            return card
    return None
