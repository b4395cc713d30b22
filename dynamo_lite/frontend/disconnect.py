"""Noticing a client that hangs up while its request is still being worked on.

Starlette only notices a disconnect once a response is being sent. A non-streaming request, and a
streaming one while its first token is awaited (a long prefill, a KV transfer), would otherwise keep
its worker busy for a client that is gone: `unless_disconnected` races the work against the client's
`http.disconnect` and cancels the work (which closes the worker stream, aborting it there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before its answer was ready."""


async def _until_disconnected(request: Request) -> None:
    # Only called once the body has been read: the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`; ClientDisconnected (after cancelling `work`) if the client leaves first.

    `work` runs inline in the calling task, not in a task of its own: everything it does before its
    first real wait (routing, sending the request to the worker) happens now. A task would only start
    after every request already queued on the event loop, so in a burst each request would reach its
    worker only once the whole burst had been tokenized. A watcher task cancels the caller if the
    client leaves; that cancellation is turned into ClientDisconnected here.
    """
    caller = asyncio.current_task()
    assert caller is not None
    disconnected = False

    async def watch() -> None:
        # Cancelled (below) the moment the work is over, so it never cancels the caller after that.
        nonlocal disconnected
        await _until_disconnected(request)
        disconnected = True
        caller.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not disconnected:
            raise  # cancelled from elsewhere: not ours to swallow
        caller.uncancel()  # the cancellation was ours and ends here
        raise ClientDisconnected() from None
    finally:
        watcher.cancel()
