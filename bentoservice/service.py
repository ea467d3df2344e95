"""The BentoML service: loads the served model from the model store and mounts the API at /v1."""

from __future__ import annotations

import os

import bentoml

from bentoservice import store
from bentoservice.api import create_app
from bentoservice.config import AdapterSpec, fine_tune_path_var, get_settings

settings = get_settings()
app = create_app(settings)


@bentoml.service(name="bentoservice", workers=1, traffic={"timeout": 3600},
                 labels={"openai_endpoint": "/v1"})
@bentoml.asgi_app(app, path="/v1")
class LLM:
    """One engine per process: workers=1 keeps the default adapter and hot-loaded adapters in one place."""

    def __init__(self) -> None:
        from bentoservice.engine.served import ServedModel

        stored = store.ensure_base(settings.model)
        card = store.card_for(stored.name)
        self.served = ServedModel(stored.name, stored.model_id, stored.path, settings,
                                  card.chat_template if card else None)
        self._load_adapters()
        app.state.served = self.served

    def _load_adapters(self) -> None:
        fine_tune = os.environ.get(fine_tune_path_var(self.served.name))
        specs = ([AdapterSpec(id=fine_tune)] if fine_tune else []) + settings.adapters
        for spec in specs:
            loaded = self.served.load_adapter_from(spec.id, spec.name)
            if self.served.default_adapter is None:
                self.served.set_default_adapter(loaded.name)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.served.close()
