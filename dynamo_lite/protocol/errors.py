"""The project's error hierarchy.

Every error carries structured fields so the frontend (the only place that renders errors to
clients) can map it to an OpenAI error body without parsing messages.
"""

from __future__ import annotations


class DynamoLiteError(Exception):
    """Base class. `status` is the HTTP status the frontend should answer with."""

    status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(DynamoLiteError):
    """The client sent something we cannot serve (bad field, too long, ...)."""

    status = 400
    error_type = "invalid_request_error"


class RequestTooLargeError(DynamoLiteError):
    """The request body is larger than the frontend accepts (--max-body-bytes)."""

    status = 413
    error_type = "invalid_request_error"


class RequestHeadersTooLargeError(DynamoLiteError):
    """The request headers are larger than the frontend accepts (--max-header-bytes)."""

    status = 431
    error_type = "invalid_request_error"


class RequestTimeoutError(DynamoLiteError):
    """The client took too long to send its request's headers or body (--header-read-timeout,
    --body-read-timeout)."""

    status = 408
    error_type = "invalid_request_error"


class ModelNotFoundError(DynamoLiteError):
    status = 404
    error_type = "not_found_error"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist or has no live worker.", param="model",
                         code="model_not_found")
        self.model = model


class NoWorkerAvailableError(DynamoLiteError):
    """A model is known but no instance can take the request right now."""

    status = 503
    error_type = "service_unavailable"


class OverloadedError(DynamoLiteError):
    """The frontend refused a request to protect itself and its workers (admission control): the client
    should retry after `retry_after` seconds. `code` says why (queue_full, concurrency_limit, workers_busy)."""

    status = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, *, code: str, retry_after: int):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class WorkerFailedError(DynamoLiteError):
    """A worker connection broke or a stream ended without its last frame (migratable)."""

    status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, instance_id: int | None = None):
        super().__init__(message)
        self.instance_id = instance_id


class EngineError(DynamoLiteError):
    """The engine rejected or failed a request; the message comes from the worker."""

    status = 500
    error_type = "engine_error"


class EngineDiedError(DynamoLiteError):
    """A worker's engine can no longer serve (its process died): the worker deregisters and exits
    non-zero, so that a supervisor restarts it."""

    status = 503
    error_type = "service_unavailable"


class ConfigError(DynamoLiteError):
    """An invalid flag or flag combination (raised at start-up, names the flags)."""

    status = 500
    error_type = "config_error"


class TransportError(DynamoLiteError):
    """Framing or connection problem on the request plane."""

    status = 503
    error_type = "service_unavailable"


def worker_error(status: int, message: str, *, worker: str, instance_id: int) -> DynamoLiteError:
    """The error a worker's ErrorFrame (status, message) stands for: the request plane's one mapping.

    503: the worker cannot take requests now (draining, engine dead): another worker can, so it is a
    WorkerFailedError (retried, or migrated). 4xx: the request itself is at fault, and would be on any
    worker. Anything else: the engine failed this request. `worker` names it in messages ("worker 1f").
    """
    if status == 503:
        return WorkerFailedError(f"{worker} is unavailable: {message}", instance_id=instance_id)
    if 400 <= status < 500:
        return InvalidRequestError(message)
    return EngineError(f"{worker} failed the request: {message}")
