"""The BentoML service: loads the served model from the model store and mounts the API at /v1."""

from __future__ import annotations

import bentoml

from bentoservice import store
from bentoservice.api import create_app
from bentoservice.config import get_settings

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
        app.state.served = self.served

    @bentoml.on_shutdown
    def close(self) -> None:
        self.served.close()
