"""What differs between the vLLM releases the worker supports (docs/compatibility.md lists them).

The worker leans on vLLM internals (AsyncLLM, its stat loggers, the KV event publisher, NixlConnector).
Everything below differs between 0.24 (the release built for CUDA 13 / torch 2.11, what the GPU machines
run) and 0.32 (the CPU build); the rest of those internals is the same in both, as read from both sources.

- Error classes: 0.32 splits request errors (VLLMClientError) from engine failures (VLLMServerError,
  GracefulHTTPError for admission rejections). 0.24 has none of those names: its validation errors are
  ValueErrors (VLLMValidationError subclasses ValueError) and engine failures are EngineGenerateError and
  EngineDeadError from vllm.v1.engine.exceptions.
- AsyncLLM.get_num_unfinished_requests is new after 0.24; both have it on AsyncLLM.output_processor.
- The KV event replay socket (ZmqEventPublisher._service_replay) answers [seq, payload] per batch in 0.24
  and [topic, seq, payload] in 0.32, after the DEALER's empty delimiter frame.

`check_vllm_version()` runs when the worker starts, so an unsupported release fails with the range
instead of an ImportError or AttributeError from deep inside the engine.
"""

from __future__ import annotations

import functools
from typing import Any

from dynamo_lite.protocol.errors import ConfigError

# Oldest and first unsupported (major, minor); both ends were run (0.24.0 on an H200, 0.32.0 on CPU).
MIN_VERSION = (0, 24)
END_VERSION = (0, 33)


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a vLLM version string ("0.32.0", "0.24.0+cu130", "0.33.0rc1.dev5+g1234")."""
    from packaging.version import InvalidVersion, Version

    try:
        parts = Version(version).release
    except InvalidVersion as e:
        raise ConfigError(f"cannot read vLLM's version {version!r}") from e
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version; ConfigError naming the supported range if it is outside it."""
    if version is None:
        import vllm

        version = vllm.__version__
    if not MIN_VERSION <= release(version) < END_VERSION:
        low, end = ".".join(map(str, MIN_VERSION)), ".".join(map(str, END_VERSION))
        raise ConfigError(f"vLLM {version} is not supported: the worker runs on vLLM >= {low}, < {end} "
                          "(see docs/compatibility.md)", param="vllm")
    return version


@functools.cache
def request_error_classes() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(errors a request's client caused -> InvalidRequestError, engine failures -> EngineError)."""
    import vllm.exceptions as vllm_exceptions

    client = getattr(vllm_exceptions, "VLLMClientError", None)
    if client is not None:  # 0.32 and later
        return (client,), (vllm_exceptions.GracefulHTTPError, vllm_exceptions.VLLMServerError)
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    return (ValueError,), (EngineGenerateError, EngineDeadError)


def unfinished_requests(llm: Any) -> int:
    """Requests AsyncLLM still tracks (generating or waiting for their last output)."""
    method = getattr(llm, "get_num_unfinished_requests", None)
    if method is not None:
        return method()
    return llm.output_processor.get_num_unfinished_requests()


def replay_frame(frames: list[bytes]) -> tuple[int, bytes] | None:
    """(seq, payload) of one reply from vLLM's KV event replay socket as a DEALER receives it
    ([b"", topic, seq, payload] from 0.32, [b"", seq, payload] from 0.24); None for anything else.
    The end of a replay is seq -1 (payload b"")."""
    if len(frames) == 4 and not frames[0]:
        seq, payload = frames[2], frames[3]
    elif len(frames) == 3 and not frames[0]:
        seq, payload = frames[1], frames[2]
    else:
        return None
    if len(seq) != 8:
        return None
    return int.from_bytes(seq, "big", signed=True), payload
