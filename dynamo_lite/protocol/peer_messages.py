"""Wire types of the embedded event bus (events/embedded.py): its discovery record and the frames two buses
exchange over one TCP connection (length-prefixed msgpack, transport/framing.py).

A connection is opened by the bus that wants something (the *dialer*) to the bus that has it (the
*listener*):

Frames are msgpack arrays (tag first): a message costs its subject and payload plus a few bytes.

    dialer   -> listener   PeerHello (first), PeerSubscribe, PeerUnsubscribe, PeerRequest
    listener -> dialer     PeerWelcome (first), PeerServes, PeerMessage, PeerReply, PeerAck
"""

from __future__ import annotations

from typing import Union

import msgspec


class EventEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where a bus listens, under keys.event_endpoint_key (msgspec JSON, attached to the bus's lease)."""

    bus_id: int
    host: str
    port: int
    pid: int = 0
    name: str = ""  # the process kind, for logs ("vllm-decode", "dynamo_lite-frontend", ...)


class PeerHello(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="hello"):
    bus_id: int
    namespace: str
    subscriptions: list[str]  # every subject the dialer subscribes to right now


class PeerWelcome(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag="welcome"):
    bus_id: int
    serves: list[str]  # every subject the listener answers requests on right now


class PeerSubscribe(msgspec.Struct, frozen=True, array_like=True, tag="sub"):
    subject: str
    ack: int  # echoed in a PeerAck once the listener sends this subject's messages


class PeerUnsubscribe(msgspec.Struct, frozen=True, array_like=True, tag="unsub"):
    subject: str


class PeerServes(msgspec.Struct, frozen=True, array_like=True, tag="serves"):
    subject: str
    serving: bool  # False: the listener stopped answering on subject


class PeerMessage(msgspec.Struct, frozen=True, array_like=True, tag="msg"):
    subject: str
    data: bytes


class PeerRequest(msgspec.Struct, frozen=True, array_like=True, tag="req"):
    request_id: int
    subject: str
    data: bytes


class PeerReply(msgspec.Struct, frozen=True, array_like=True, tag="reply"):
    request_id: int
    data: bytes
    error: str = ""  # the responder's handler failed: data is empty


class PeerAck(msgspec.Struct, frozen=True, array_like=True, tag="ack"):
    ack: int


PeerFrame = Union[PeerHello, PeerWelcome, PeerSubscribe, PeerUnsubscribe, PeerServes, PeerMessage,
                  PeerRequest, PeerReply, PeerAck]
peer_frame_decoder = msgspec.msgpack.Decoder(PeerFrame)
endpoint_json_decoder = msgspec.json.Decoder(EventEndpoint)
