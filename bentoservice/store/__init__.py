"""The BentoML model store: model cards (cards.py), base models (bases.py), adapters and fine-tune folders
(adapters.py), embedding and rerank models (encoders.py), over the store itself (models.py).

The package exposes each module's public names, so callers write `store.resolve_base(...)`.
"""

from bentoservice.store.adapters import (
    ACCEPTED_FORMS,
    ADAPTER_FILES,
    AdapterNotFound,
    AdapterSource,
    UnsafeAdapterId,
    adapter_source,
    adapters_of,
    catalogued_folder,
    fine_tune_dir,
    latest_fine_tune,
    new_fine_tune_path,
    save_adapter,
    servable_adapters,
)
from bentoservice.store.bases import HF_FILES, ensure_base, import_model, resolve_base, save_merged
from bentoservice.store.cards import Card, card_for, cards
from bentoservice.store.encoders import (
    BUNDLED_ENCODERS,
    ENCODER_KINDS,
    ensure_encoder,
    import_encoder,
    resolve_encoder,
    save_encoder,
)
from bentoservice.store.models import StoredModel, StoreError, bentoml_home, get, list_models, store_root

__all__ = [
    "ACCEPTED_FORMS",
    "ADAPTER_FILES",
    "AdapterNotFound",
    "AdapterSource",
    "BUNDLED_ENCODERS",
    "Card",
    "ENCODER_KINDS",
    "HF_FILES",
    "StoreError",
    "StoredModel",
    "UnsafeAdapterId",
    "adapter_source",
    "catalogued_folder",
    "adapters_of",
    "bentoml_home",
    "card_for",
    "cards",
    "ensure_base",
    "ensure_encoder",
    "fine_tune_dir",
    "get",
    "import_encoder",
    "import_model",
    "latest_fine_tune",
    "list_models",
    "new_fine_tune_path",
    "resolve_base",
    "resolve_encoder",
    "save_adapter",
    "save_encoder",
    "save_merged",
    "servable_adapters",
    "store_root",
]
