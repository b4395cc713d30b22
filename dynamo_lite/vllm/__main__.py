"""`python -m dynamo_lite.vllm [vLLM engine flags] [dynamo_lite worker flags]` (see --help)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from dynamo_lite.protocol.errors import ConfigError, DynamoLiteError, EngineDiedError
from dynamo_lite.runtime.logging import configure_logging

logger = logging.getLogger("dynamo_lite.vllm")


def use_fabric(advertise_host: str) -> None:
    """NCCL / Gloo / UCX settings for this host's InfiniBand / RoCE ports, where the operator set none
    (runtime/fabric.py; tensor parallelism across hosts and NIXL read them), and a warning when a worker
    that other hosts reach would send its traffic over plain Ethernet."""
    from dynamo_lite.runtime import fabric

    fab = fabric.detect()
    added = fabric.environment(fab, os.environ)
    os.environ.update(added)
    if added:
        logger.info("fabric: %s", " ".join(f"{k}={v}" for k, v in added.items()))
    if not advertise_host.startswith("127."):  # one host needs no fabric
        for text in fabric.warnings(fab, advertise_host):
            logger.warning("fabric: %s (python -m dynamo_lite.doctor checks it)", text)


def main(argv: list[str] | None = None) -> int:
    from dynamo_lite.vllm.compat import check_vllm_version

    try:
        # First: an unsupported release would otherwise fail inside the imports below.
        check_vllm_version()
    except ConfigError as e:
        raise SystemExit(f"python -m dynamo_lite.vllm: error: {e.message}") from e
    from dynamo_lite.engine.worker import serve_workers
    from dynamo_lite.vllm import nixl_progress
    from dynamo_lite.vllm.args import PROG, nixl_environment, parse_args
    from dynamo_lite.vllm.engine import VllmEngine

    engine_args, config = parse_args(argv)
    configure_logging("vllm-prefill" if config.is_prefill_worker else "vllm-worker")
    use_fabric(config.advertise_host)
    # Read by our vLLM plugin in the engine's processes (nixl_progress explains the busy loop it removes);
    # it matters for any KV connector config, --connector nixl or the user's own --kv-transfer-config.
    os.environ.setdefault(nixl_progress.ENV, str(nixl_progress.NIXL_PROGRESS_DELAY_US))
    if config.connector == "nixl":
        # Process-wide settings NIXL reads when the engine starts; set before building it.
        try:
            os.environ.update(nixl_environment(config.advertise_host, dict(os.environ),
                                               config.nixl_side_channel_port))
        except ConfigError as e:
            print(f"{PROG}: error: {e.message}", file=sys.stderr)
            return 2
    logger.info("starting vLLM worker for %s as %s in namespace %s, advertising %s%s", engine_args.model,
                config.role, config.namespace, config.advertise_host,
                f" (NIXL side channel {os.environ.get('VLLM_NIXL_SIDE_CHANNEL_HOST')}:"
                f"{os.environ.get('VLLM_NIXL_SIDE_CHANNEL_PORT')})" if config.connector == "nixl" else "")
    try:
        asyncio.run(serve_workers([VllmEngine(engine_args)], [config], discovery_url=config.discovery_url,
                                  event_bus_url=config.event_plane_url,
                                  client_name=f"vllm-{config.role}"))
    except KeyboardInterrupt:
        return 130
    except EngineDiedError as e:
        logger.error("%s: deregistered; exiting with status 1 so that a supervisor restarts the worker",
                     e.message)
        return 1
    except DynamoLiteError as e:
        # A taken request-plane port, etcd unreachable and the like: one clear line, not a traceback.
        logger.error("cannot serve: %s", e.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
