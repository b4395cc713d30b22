"""The dashboard's admission-control panels (queued requests, queue wait, rejections by reason) against the
/metrics of a frontend app that queued a request and refused one: every metric and label they query is one
it exports then. Admission is off in the e2e stacks, so their labelled samples appear only here."""

from __future__ import annotations

import asyncio

from tests.dashboard import ADMISSION_METRICS, SCRAPE_LABELS, dashboard_queries, exported_names, split_query
from tests.integration.test_admission import LoadReportingRouter, _until, assert_overloaded
from tests.integration.test_frontend_app import MODEL, ScriptedEngine, chat_body, model_dir, running_stack

__all__ = ["model_dir"]  # the module-scoped fixture, shared


async def test_admission_panels_chart_what_a_refusing_frontend_exports(model_dir):
    router = LoadReportingRouter()
    async with running_stack(router, busy_waiting_requests=2, queue_timeout=0.2) as stack:
        worker = await stack.add_worker(ScriptedEngine(model_dir))
        router.report(worker.instance_id, waiting=2)  # busy: the request queues, then is refused
        response = await stack.http.post("/v1/chat/completions", json=chat_body())
        assert_overloaded(response, "workers_busy")
        waiting = asyncio.create_task(stack.http.post("/v1/chat/completions", json=chat_body()))
        admission = stack.app.state.service.admission
        await asyncio.wait_for(_until(lambda: admission.queued(MODEL) == 1), 5)
        text = (await stack.http.get("/metrics")).text  # scraped while one request waits
        router.report(worker.instance_id, waiting=0)
        assert (await asyncio.wait_for(waiting, 5)).status_code == 200
    exported, labels = exported_names(text)
    charted: set[str] = set()
    for expr in dashboard_queries():
        metrics, used_labels = split_query(expr)
        if metrics & ADMISSION_METRICS:
            charted |= metrics
            assert metrics <= exported, (expr, metrics - exported)
            assert used_labels <= labels | SCRAPE_LABELS, (expr, used_labels - labels)
    assert charted == ADMISSION_METRICS
    assert 'dynamo_lite_frontend_queued_requests{model="' + MODEL + '"} 1.0' in text
    assert 'reason="workers_busy"' in text
