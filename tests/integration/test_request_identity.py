"""A client's X-Request-Id names the generation on the worker and in the answer."""

from __future__ import annotations

from tests.integration.test_frontend_app import MODEL, ScriptedEngine, chat_body, model_dir, running_stack  # noqa: F401


async def test_client_request_id_is_the_worker_request_id_and_stays_unique(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        answers = [await stack.http.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "job-7"})
                   for _ in range(2)]
        ids = [answer.json()["id"] for answer in answers]
        assert all(i.startswith("chatcmpl-job-7-") for i in ids) and ids[0] != ids[1]
        assert [r.request_id for r in engine.requests] == ids  # the worker ran them under the same ids
        assert all(answer.headers["x-request-id"] == "job-7" for answer in answers)
        made = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
        assert made.json()["id"] == "cmpl-" + made.headers["x-request-id"] == engine.requests[-1].request_id
