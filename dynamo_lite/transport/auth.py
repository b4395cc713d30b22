"""The shared-secret handshake of the request plane and of the embedded event plane's peer links.

Why: a worker's request-plane port (and every embedded event bus's port) is an open TCP port; without
this, whoever reaches it can run generations there, bypassing the frontend's API key. With a secret
configured (--plane-secret-file / DYN_PLANE_SECRET_FILE, or DYN_PLANE_SECRET: the same on every
component), each new connection proves, both ways, that its peer knows the secret before anything else
is read from it. Connections are pooled, so the two round trips are paid once per connection.

The wire (raw frames: a 4-byte big-endian length, then the payload; never msgpack, so a peer without the
secret can be told apart by its first frame):

    dialer -> listener  HELLO      MAGIC 1, nonce_d (32 bytes)
    listener -> dialer  CHALLENGE  MAGIC 2, nonce_l (32), HMAC(secret, "listener|" plane "|" nonce_d nonce_l)
    dialer -> listener  PROOF      MAGIC 3, HMAC(secret, "dialer|" plane "|" nonce_d nonce_l)
    listener -> dialer  VERDICT    MAGIC 4, 1 (accepted) or 0 (refused)

Fresh nonces on both sides defeat replay; the role label keeps one side's MAC from being reflected back
as the other's; the plane name keeps a request-plane exchange from being used on the event plane. The
secret itself never crosses the wire, and MACs are compared in constant time (hmac.compare_digest).
The dialer sends its proof even when the listener's MAC is wrong, so the listener can log the refusal;
the dialer then refuses that listener as well (it does not know the secret: not a worker of ours).

A peer whose first frame is not a HELLO (no secret configured, or a raw TCP client) gets `refusal` (the
request plane sends an ErrorFrame that names the missing option) and is hung up on; nothing it sent is
decoded. Without a secret, nothing here runs and the planes behave as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import struct
import time

from dynamo_lite.protocol.errors import TransportError

logger = logging.getLogger(__name__)

MAGIC = b"DLAUTH1"
HELLO, CHALLENGE, PROOF, VERDICT = (MAGIC + bytes([kind]) for kind in (1, 2, 3, 4))
NONCE_SIZE = 32
MAC_SIZE = hashlib.sha256().digest_size
MAX_HANDSHAKE_FRAME = 256  # a handshake frame is < 100 bytes: anything longer is not one (not read)
HANDSHAKE_TIMEOUT = 5.0  # a peer that connects and says nothing is hung up on after this
WARN_INTERVAL = 60.0  # seconds between warnings about refused connections from one host
_HEADER = struct.Struct(">I")
SECRET_OPTIONS = "--plane-secret-file / DYN_PLANE_SECRET_FILE or DYN_PLANE_SECRET"
MIN_SECRET_BYTES = 16


class PlaneAuthError(TransportError):
    """The handshake failed: the peer has no secret, another secret, or does not speak it."""


def describe_peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "an unknown peer")


async def _read(reader: asyncio.StreamReader) -> bytes | None:
    """One handshake frame, or None if what comes is not one (too long; its body is not read). EOF and
    short reads raise (asyncio.IncompleteReadError)."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_HANDSHAKE_FRAME:
        return None
    return await reader.readexactly(size)


def _write(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(_HEADER.pack(len(payload)) + payload)


class PlaneAuth:
    """Both ends of the handshake for one plane ("request" or "events") and one secret."""

    def __init__(self, secret: bytes, plane: str, *, timeout: float = HANDSHAKE_TIMEOUT):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a plane secret needs at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._plane = plane.encode()
        self._timeout = timeout
        self._warned: dict[str, float] = {}  # peer host -> when its last refusal was logged as a warning

    def _mac(self, role: bytes, dialer_nonce: bytes, listener_nonce: bytes) -> bytes:
        return hmac.new(self._secret, role + b"|" + self._plane + b"|" + dialer_nonce + listener_nonce,
                        hashlib.sha256).digest()

    async def dial(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        """Prove the secret to the listener at `peer` and check that it knows it too.

        PlaneAuthError (a TransportError) saying what went wrong; connection errors pass through."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._dial(reader, writer, peer)
        except TimeoutError as e:
            raise PlaneAuthError(f"{peer} did not complete the plane-secret handshake within "
                                 f"{self._timeout:g}s") from e
        except asyncio.IncompleteReadError as e:
            raise PlaneAuthError(f"{peer} hung up during the plane-secret handshake") from e

    async def _dial(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        nonce = secrets.token_bytes(NONCE_SIZE)
        _write(writer, HELLO + nonce)
        challenge = await _read(reader)
        if challenge is None or not challenge.startswith(CHALLENGE) or \
                len(challenge) != len(CHALLENGE) + NONCE_SIZE + MAC_SIZE:
            raise PlaneAuthError(f"{peer} does not ask for the plane secret: it runs without one (every "
                                 f"component needs the same {SECRET_OPTIONS})")
        listener_nonce = challenge[len(CHALLENGE):len(CHALLENGE) + NONCE_SIZE]
        listener_mac = challenge[len(CHALLENGE) + NONCE_SIZE:]
        _write(writer, PROOF + self._mac(b"dialer", nonce, listener_nonce))
        verdict = await _read(reader)
        if verdict != VERDICT + b"\x01":
            raise PlaneAuthError(f"{peer} refused our plane secret: the secrets differ (every component "
                                 f"needs the same {SECRET_OPTIONS})")
        if not hmac.compare_digest(listener_mac, self._mac(b"listener", nonce, listener_nonce)):
            raise PlaneAuthError(f"{peer} accepted us but does not know the plane secret: not one of "
                                 "this deployment's processes")

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     refusal: bytes | bytearray | None = None) -> bool:
        """Check that the peer that dialed us knows the secret (and show it that we do). False, after
        logging the refusal and writing `refusal` (a whole frame) to a peer that sent no HELLO, when it
        does not; the caller then closes the connection."""
        peer = describe_peer(writer)
        try:
            async with asyncio.timeout(self._timeout):
                problem = await self._accept(reader, writer, refusal)
        except TimeoutError:
            problem = f"sent no plane-secret handshake within {self._timeout:g}s"
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            problem = "hung up during the plane-secret handshake"
        if problem is None:
            return True
        # A misconfigured peer redials every second or so: one warning per host a minute, the rest at debug.
        host, now = peer.rpartition(":")[0], time.monotonic()
        loud = now - self._warned.get(host, -math.inf) >= WARN_INTERVAL
        if loud:
            if len(self._warned) > 1024:  # a scan from many addresses must not grow this without bound
                self._warned.clear()
            self._warned[host] = now
        logger.log(logging.WARNING if loud else logging.DEBUG, "%s plane: refused the connection from %s: "
                   "it %s", self._plane.decode(), peer, problem)
        return False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      refusal: bytes | bytearray | None) -> str | None:
        hello = await _read(reader)
        if hello is None or not hello.startswith(HELLO) or len(hello) != len(HELLO) + NONCE_SIZE:
            if refusal is not None:
                writer.write(refusal)
                await writer.drain()
            return f"presented no plane secret ({SECRET_OPTIONS} is set here)"
        dialer_nonce = hello[len(HELLO):]
        nonce = secrets.token_bytes(NONCE_SIZE)
        _write(writer, CHALLENGE + nonce + self._mac(b"listener", dialer_nonce, nonce))
        proof = await _read(reader)
        expected = self._mac(b"dialer", dialer_nonce, nonce)
        accepted = proof is not None and proof.startswith(PROOF) and \
            hmac.compare_digest(proof[len(PROOF):], expected)
        _write(writer, VERDICT + (b"\x01" if accepted else b"\x00"))
        await writer.drain()
        return None if accepted else "presented a wrong plane secret"


def plane_auth(secret: bytes | None, plane: str) -> PlaneAuth | None:
    """The handshake for `plane` when a secret is configured, else None (no handshake: as before)."""
    return PlaneAuth(secret, plane) if secret else None
