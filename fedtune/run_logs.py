"""Where log lines go: every library's log (Flower, Ray, alembic, transformers, Python warnings)
into one file per component under the run's ``logs/`` folder; on the console only fedtune's own
warnings and errors, or everything with ``--verbose``.

This routes records, it filters none: each warning and log line is still written, to the file.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Set for the Ray workers of a simulation: their log file, and whether to keep their stderr.
WORKER_LOG_ENV = "FEDTUNE_WORKER_LOG"
WORKER_VERBOSE_ENV = "FEDTUNE_WORKER_VERBOSE"


class _OwnLines(logging.Filter):
    """The console without --verbose: fedtune's own records only, from ``level`` up (INFO for a
    command; WARNING during a federated run, whose progress the run view shows)."""

    def __init__(self, level: int = logging.INFO):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("fedtune") and record.levelno >= self.level


def _file_handler(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.DEBUG)
    handler._fedtune = True  # type: ignore[attr-defined]
    return handler


def console_handler(verbose: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(_OwnLines())
    handler._fedtune = True  # type: ignore[attr-defined]
    return handler


def setup_console(verbose: bool) -> None:
    """Before a run folder is known: the console handler alone (used by every command)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_fedtune", False)]:
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(console_handler(verbose))
    # Warnings become `py.warnings` log records: to the file, not the screen. (Off first: on again
    # re-installs the hook where something replaced warnings.showwarning since.)
    logging.captureWarnings(False)
    logging.captureWarnings(True)


def route_logs(log_dir: Path, component: str, verbose: bool) -> Path:
    """Send this process's log records to ``log_dir/<component>.log``; called once the run
    folder is known. Libraries that attach their own console handlers (Flower, Ray) are
    re-pointed at the file (and keep their console handler only with ``verbose``)."""
    path = Path(log_dir) / f"{component}.log"
    handler = _file_handler(path)
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and getattr(h, "_fedtune", False)]:
        root.removeHandler(h)
        h.close()
    root.addHandler(handler)
    for h in root.handlers:  # the run view shows progress: fedtune's INFO lines go to the file
        for f in h.filters:
            if isinstance(f, _OwnLines):
                f.level = logging.WARNING
    capture_library_loggers(handler, verbose)
    return path


def capture_library_loggers(handler: logging.Handler, verbose: bool) -> None:
    """Loggers that do not propagate to the root (Flower's ``flwr``, Ray's ``ray``) get the file
    handler; their own console handlers are removed unless ``verbose``."""
    for name in ["flwr", "ray", *[n for n in logging.root.manager.loggerDict if not n.startswith("fedtune")]]:
        logger = logging.getLogger(name)
        if logger.propagate and not logger.handlers:
            continue  # reaches the root's handlers already
        if not verbose:
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    logger.removeHandler(h)
        if not logger.propagate and handler not in logger.handlers:
            logger.addHandler(handler)


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook`` for a simulation's site workers: the worker's log
    records, Python warnings and (without --verbose) its stdout/stderr go to the run's
    ``logs/sites.log``."""
    target = os.environ.get(WORKER_LOG_ENV)
    if not target:
        return
    verbose = os.environ.get(WORKER_VERBOSE_ENV) == "1"
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not verbose:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    handler = _file_handler(path)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_fedtune", False) for h in root.handlers):
        root.addHandler(handler)
    logging.captureWarnings(True)
    capture_library_loggers(handler, verbose)
