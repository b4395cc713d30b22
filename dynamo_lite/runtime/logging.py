"""One logging setup for every component."""

from __future__ import annotations

import logging
import os


def configure_logging(component: str, level: str | None = None) -> None:
    """Log to stderr with the component name; level from DYN_LOG (default info)."""
    level = (level or os.environ.get("DYN_LOG", "info")).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s",
    )
