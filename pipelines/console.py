"""Console output: the pipeline logs through :mod:`logging` under the ``pipelines`` logger.

The CLI (and each Ray Train worker) calls :func:`configure_console`, which prints each record as the bare
message: progress (INFO) on stdout, lines such as ``[train] lenet5: test_acc 0.97 ...``; warnings and
errors on stderr. Libraries embedding the stages keep control of their own logging setup: nothing is
configured on import.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["configure_console", "timestamped", "duration"]

LOGGER = "pipelines"
_HANDLER_NAME = "pipelines-console"


class _Stream(logging.StreamHandler):
    """Writes to the current ``sys.stdout``/``sys.stderr`` (looked up per record, so redirection works)."""

    def __init__(self, stream_name: str, accept) -> None:
        super().__init__()
        self.stream_name = stream_name
        self.addFilter(accept)
        self.setFormatter(_Redacting("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.stream_name)
        super().emit(record)


class _Redacting(logging.Formatter):
    """Masks a URL's password in whatever a record prints (an error quoting the tracking server's URL, the
    traceback ``--debug`` logs): logs are copied into tickets, CI output and Ray's job logs."""

    def format(self, record: logging.LogRecord) -> str:
        from .config import redact_text

        return redact_text(super().format(record))


def configure_console(level: int = logging.INFO) -> logging.Logger:
    """Print the ``pipelines`` logger's records as plain messages: below WARNING on stdout, the rest on
    stderr (idempotent)."""
    logger = logging.getLogger(LOGGER)
    if not any(getattr(h, "name", None) == _HANDLER_NAME for h in logger.handlers):
        for stream_name, accept in (("stdout", lambda r: r.levelno < logging.WARNING),
                                    ("stderr", lambda r: r.levelno >= logging.WARNING)):
            handler = _Stream(stream_name, accept)
            handler.name = _HANDLER_NAME
            logger.addHandler(handler)
        logger.propagate = False  # one line per message, whatever the root logger does
    logger.setLevel(level)
    return logger


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``: how long, at a glance."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def timestamped(message: str) -> str:
    """``HH:MM:SS message``: progress lines of long-running work carry the wall-clock time."""
    return f"{time.strftime('%H:%M:%S')} {message}"
