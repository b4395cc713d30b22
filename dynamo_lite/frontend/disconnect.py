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
    """The result of `work`; ClientDisconnected (after cancelling `work`) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            # The client left, or we are cancelled ourselves: stop the work and let it unwind (closing
            # its worker stream) before the caller touches anything the work was using.
            task.cancel()
            await asyncio.wait((task,))
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
