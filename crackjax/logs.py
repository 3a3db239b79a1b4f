"""Logging set-up for the command line: plain lines, and no tracebacks for input problems."""

from __future__ import annotations

import logging
import os

from crackjax.errors import CrackjaxError
from crackjax.weights.entry import WeightsError

# Errors caused by the user's input or environment: reported as one message.
USER_ERRORS = (CrackjaxError, WeightsError)


def prefect_environment() -> None:
    """Set Prefect defaults before it is imported: no analytics, crackjax logs in flow-run logs.

    Prefect 3.9's temporary server logs a "database is locked" traceback from its
    analytics heartbeat when it starts on a fresh Prefect home; turning analytics off
    avoids it. Values already in the environment win.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "crackjax")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    logging.getLogger("crackjax").setLevel(logging.INFO)


class UserErrorTracebackFilter(logging.Filter):
    """Drop the traceback from log records whose exception is an input problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info = None
            record.exc_text = None
        return True


def hide_user_error_tracebacks() -> None:
    """Attach `UserErrorTracebackFilter` to every handler of the root and Prefect loggers."""
    log_filter = UserErrorTracebackFilter()
    loggers = [logging.getLogger()] + [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith(("prefect", "crackjax"))
    ]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if log_filter not in handler.filters:
                handler.addFilter(log_filter)


def configure_plain_logging(level: int = logging.INFO) -> None:
    """Log crackjax messages as plain lines on stderr, for commands that run outside Prefect."""
    logger = logging.getLogger("crackjax")
    # Another library may have configured the root logger; without this, each line
    # would be printed twice.
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
