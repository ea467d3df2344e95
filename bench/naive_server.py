"""The naive baseline: an OpenAI-style streaming chat route that runs one `generate` per request,
one request at a time (a lock), streaming each token as `generate` produces it.

    python bench/naive_server.py MODEL_DIR --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class TokenQueue(BaseStreamer):
    """Hands each new token id to the request's event loop (the prompt, passed first, is skipped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, int(value.reshape(-1)[0]))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def create_app(model_dir: str, device: str, dtype: torch.dtype) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    lock = threading.Lock()
    app = FastAPI()

    def generate(ids: torch.Tensor, max_tokens: int, streamer: TokenQueue) -> None:
        with lock, torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=tokenizer.eos_token_id,
            )

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(device)
        queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(
            target=generate,
            args=(ids, body.get("max_tokens", 64), TokenQueue(asyncio.get_running_loop(), queue)),
            daemon=True,
        ).start()
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
        }

        async def events():
            tokens: list[int] = []
            sent = ""
            while (token := await queue.get()) is not None:
                tokens.append(token)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(sent) and not text.endswith("\ufffd"):
                    delta, sent = text[len(sent) :], text
                    yield f"data: {json.dumps({**meta, 'choices': [{'index': 0, 'delta': {'content': delta}}]})}\n\n"
            reason = "length" if len(tokens) >= body.get("max_tokens", 64) else "stop"
            yield f"data: {json.dumps({**meta, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': reason}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, or auto (bf16 on GPU)")
    args = parser.parse_args()
    dtype = (
        (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
        if args.dtype == "auto"
        else getattr(torch, args.dtype)
    )
    uvicorn.run(create_app(args.model_dir, args.device, dtype), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
