"""Baseline for bench_serving: the same HTTP stack (uvicorn + uvloop + httptools + FastAPI) answering
a canned chat completion without tokenizing, routing or calling a worker. Its throughput is the
ceiling any Python frontend on this machine can reach; bench_serving reports the frontend against it."""

from __future__ import annotations

import sys

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

CANNED = msgspec.json.encode({
    "id": "chatcmpl-floor", "object": "chat.completion", "created": 0, "model": "mock-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 64},
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 400, "completion_tokens": 64, "total_tokens": 464},
})


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        msgspec.json.decode(await request.body())  # parse the body like a real server would
        return Response(CANNED, media_type="application/json")

    return app


if __name__ == "__main__":
    uvicorn.run(create_app(), host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                access_log=False, log_level="warning")
