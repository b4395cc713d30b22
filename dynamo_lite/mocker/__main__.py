"""`python -m dynamo_lite.mocker`: N simulated workers in one process, registered like vLLM workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import NoReturn

from dynamo_lite.mocker.config import MockerConfig, load_model_facts
from dynamo_lite.presets import PRESET_HELP, apply_worker_preset
from dynamo_lite.protocol.errors import ConfigError, DynamoLiteError
from dynamo_lite.runtime.config import add_config_arguments, config_from_args
from dynamo_lite.runtime.logging import configure_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynamo_lite.mocker",
        description="Simulated LLM workers (no GPU, no weights): same discovery, request plane and KV "
                    "events as the vLLM worker, for tests and benchmarks at scale.")
    add_config_arguments(parser, MockerConfig)
    parser.add_argument("--preset", metavar="NAME", default=None, help=PRESET_HELP)  # expanded before parsing
    return parser


def parse_config(argv: list[str] | None = None) -> MockerConfig:
    """Parse flags (env twins as defaults); a bad value or combination exits with a CLI error."""
    try:
        parser = build_parser()  # reads the environment twins, which may be malformed
    except ConfigError as e:
        _exit_with_error(e.message)
    try:  # the preset's flags, where the command line gives none (presets.py)
        argv = apply_worker_preset(sys.argv[1:] if argv is None else argv, os.environ, engine="mocker")
        return config_from_args(MockerConfig, parser.parse_args(argv))
    except ConfigError as e:
        parser.error(e.message)  # exits with status 2 and the usage line, like any argparse error
        raise  # unreachable: parser.error exits


def _exit_with_error(message: str) -> NoReturn:
    print(f"python -m dynamo_lite.mocker: error: {message}", file=sys.stderr)
    sys.exit(2)


async def serve(config: MockerConfig) -> None:
    # The worker shell pulls in etcd/NATS clients; import here so --help stays instant.
    from dynamo_lite.engine.base import Engine
    from dynamo_lite.engine.worker import serve_workers
    from dynamo_lite.mocker.data_parallel import DataParallelMockerEngine
    from dynamo_lite.mocker.engine import MockerEngine

    facts = await asyncio.to_thread(load_model_facts, config)
    engines: list[Engine] = [DataParallelMockerEngine(config, facts=facts) if config.data_parallel_size > 1
                             else MockerEngine(config, facts=facts) for _ in range(config.num_workers)]
    logger.info("starting %d mocker worker(s) for %s (%s%s)", config.num_workers, facts.served_model_name,
                config.role, f", {config.data_parallel_size} data-parallel ranks each"
                if config.data_parallel_size > 1 else "")
    await serve_workers(engines, [config] * config.num_workers, discovery_url=config.discovery_url,
                        event_bus_url=config.event_plane_url, client_name="mocker")


def run_event_loop(main_coroutine) -> None:
    """uvloop when installed: the request plane's many small frames cost less on it."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coroutine)
        return
    uvloop.run(main_coroutine)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    configure_logging("mocker")
    try:
        run_event_loop(serve(config))
    except ConfigError as e:
        # Problems found in the model folder (missing config.json, pool smaller than the context).
        _exit_with_error(e.message)
    except DynamoLiteError as e:
        # etcd unreachable and the like: one clear line, not a traceback.
        logger.error("cannot serve: %s", e.message)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
