"""Framing over in-memory asyncio streams (no sockets)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from dynamo_lite.protocol.errors import TransportError
from dynamo_lite.protocol.messages import (ErrorFrame, GenerateFrame, GenerateRequest, SamplingOptions,
                                           WorkerStatsRequest, msgpack_encoder)
from dynamo_lite.transport import framing


class CollectingWriter:
    """Stands in for a StreamWriter: records every write call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))


def reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_frames_round_trip_and_clean_eof_gives_none():
    request = GenerateRequest(request_id="r1", token_ids=[1, 2, 3],
                              sampling=SamplingOptions(max_tokens=8, temperature=0.0),
                              kv_transfer_params={"do_remote_decode": True})
    reply = GenerateFrame(token_ids=[7, 8], finish_reason="length", last=True)
    reader = reader_with(bytes(framing.encode_frame(request)) + bytes(framing.encode_frame(reply)))

    assert framing.decode_request(await framing.read_frame(reader)) == request
    assert framing.decode_reply(await framing.read_frame(reader)) == reply
    assert await framing.read_frame(reader) is None


async def test_write_frame_sends_header_and_body_in_one_write():
    writer = CollectingWriter()
    payload = msgpack_encoder.encode(WorkerStatsRequest())
    framing.write_frame(writer, payload)

    assert writer.writes == [struct.pack(">I", len(payload)) + payload]
    reader = reader_with(writer.writes[0])
    assert framing.decode_request(await framing.read_frame(reader)) == WorkerStatsRequest()


async def test_incoming_frame_above_limit_is_rejected_before_reading_it():
    reader = reader_with(struct.pack(">I", framing.MAX_FRAME_SIZE + 1), eof=False)
    with pytest.raises(TransportError, match="exceeds"):
        await framing.read_frame(reader)


def test_outgoing_frame_above_limit_is_rejected(monkeypatch):
    monkeypatch.setattr(framing, "MAX_FRAME_SIZE", 16)
    with pytest.raises(TransportError, match="exceeds"):
        framing.encode_frame(ErrorFrame(message="x" * 32))
    with pytest.raises(TransportError, match="exceeds"):
        framing.write_frame(CollectingWriter(), b"y" * 17)


async def test_eof_inside_a_frame_body_is_an_error():
    reader = reader_with(struct.pack(">I", 10) + b"abc")
    with pytest.raises(TransportError, match="3 of 10"):
        await framing.read_frame(reader)


async def test_eof_inside_a_frame_header_is_an_error():
    reader = reader_with(b"\x00\x00")
    with pytest.raises(TransportError, match="header"):
        await framing.read_frame(reader)


async def test_frame_split_across_reads_is_reassembled():
    frame = bytes(framing.encode_frame(GenerateFrame(token_ids=list(range(100)))))
    reader = asyncio.StreamReader()
    pending = asyncio.ensure_future(framing.read_frame(reader))
    for start in range(0, len(frame), 7):
        reader.feed_data(frame[start:start + 7])
        await asyncio.sleep(0)
    payload = await asyncio.wait_for(pending, timeout=5)
    assert framing.decode_reply(payload).token_ids == list(range(100))


def test_undecodable_payloads_raise_transport_error():
    with pytest.raises(TransportError):
        framing.decode_request(b"\xc1")
    with pytest.raises(TransportError):
        framing.decode_reply(msgpack_encoder.encode({"type": "nonsense"}))
