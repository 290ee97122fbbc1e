"""Process logging for the ``fedscan`` commands: one format, quiet third-party loggers."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(verbose: bool) -> None:
    """Log to stderr at INFO (``FEDSCAN_LOG`` to change), DEBUG with ``verbose``; chatty libraries at WARNING."""
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("FEDSCAN_LOG", "INFO").upper(), logging.INFO)
    # call it before importing fedscan.compose: opacus configures the root logger (WARNING) on import,
    # and basicConfig does nothing once the root logger has a handler
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("amqtt", "transitions", "alembic", "paho"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
