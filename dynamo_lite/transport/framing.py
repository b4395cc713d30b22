"""Length-prefixed frames over asyncio streams: a 4-byte big-endian length, then a msgpack payload.

This sits on the hot path (every token frame of every request), so a frame is encoded straight into
one buffer that already holds room for its header and goes out in a single `writer.write`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import msgspec

from dynamo_lite.protocol.errors import TransportError
from dynamo_lite.protocol.messages import Reply, Request, msgpack_encoder, reply_decoder, request_decoder

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_FRAME_SIZE = 64 * 1024 * 1024  # a tokenizer.json is a few MiB; anything near this is a bug


# TCP keepalive: a peer whose host died or was cut off (no FIN, no RST) is noticed after about
# IDLE + INTERVAL * COUNT seconds, so a stream waiting on it fails (and migrates) instead of hanging.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


def tune_stream_socket(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY (token frames are tiny and latency-bound: never let Nagle hold them back) and
    keepalive probes (see KEEPALIVE_IDLE_S) on a request-plane connection."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; macOS has only SO_KEEPALIVE's defaults
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def encode_frame(message: msgspec.Struct) -> bytearray:
    """Header + msgpack body of `message`, ready for one writer.write()."""
    buffer = bytearray(HEADER_SIZE)
    msgpack_encoder.encode_into(message, buffer, HEADER_SIZE)
    size = len(buffer) - HEADER_SIZE
    if size > MAX_FRAME_SIZE:
        raise TransportError(f"frame of {size} bytes exceeds the {MAX_FRAME_SIZE}-byte limit")
    HEADER.pack_into(buffer, 0, size)
    return buffer


def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Write an already encoded payload as one frame (header and body in one write)."""
    if len(payload) > MAX_FRAME_SIZE:
        raise TransportError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME_SIZE}-byte limit")
    writer.write(HEADER.pack(len(payload)) + payload)


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload; None on a clean EOF between frames.

    Raises TransportError on EOF inside a frame or a length above MAX_FRAME_SIZE. Cancelling this
    while it waits for the header consumes nothing from the stream.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise TransportError("connection closed inside a frame header") from e
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME_SIZE:
        raise TransportError(f"incoming frame of {size} bytes exceeds the {MAX_FRAME_SIZE}-byte limit")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as e:
        raise TransportError(f"connection closed after {len(e.partial)} of {size} frame bytes") from e


def decode_request(payload: bytes) -> Request:
    try:
        return request_decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise TransportError(f"undecodable request frame: {e}") from e


def decode_reply(payload: bytes) -> Reply:
    try:
        return reply_decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise TransportError(f"undecodable reply frame: {e}") from e
