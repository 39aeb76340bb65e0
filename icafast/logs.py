"""The command line's log lines, made with less work per line.

``icafast serve`` and ``icafast connect`` log two lines per session at their default level,
INFO (the session's start and its end). Through the standard ``logging`` setup
(``basicConfig``) each line took about 65,000 instructions: a quarter of what either relay
spent in user space on a session that opens, carries one request and closes
(benchmarks/HISTORY.md, "a new session for 15–20 % less").

Every line still goes through ``logging`` (levels, ``-v``/``-q``, filters and any handler an
embedder adds work as before); what the command line installs for its own output does less:

- :class:`LineFormatter` writes ``asctime levelname message`` as ``logging.Formatter`` does
  with that format, but makes the date and time part once per second instead of once per line;
- :class:`LineHandler` writes and flushes each line at once (as ``StreamHandler`` does),
  without taking the handler's lock a second time to flush;
- under systemd, whose journal records the time itself, :class:`JournalFormatter` writes
  ``<priority>levelname message`` instead, the priority as sd-daemon(3) reads it;
- :class:`LeanRecord` (``logging.setLogRecordFactory``) fills a record without the work for
  what no line of the command line shows (thread, process and asyncio task names, the caller's
  file name taken apart), as the logging HOWTO's "Optimization" section suggests.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(message)s"
_UNKNOWN_FILE = "(unknown file)"  # (logging's pathname when it does not look for the caller)


class LineFormatter(logging.Formatter):
    """``logging.Formatter(FORMAT)`` with the date and time made once per second."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)  # (a traceback: the standard way)
        record.message = record.getMessage()
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d} {record.levelname} {record.message}"


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that flushes each line within the lock ``handle`` already holds."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:  # (as StreamHandler.emit)
            raise
        except Exception:
            self.handleError(record)


_time_ns = time.time_ns
_start = logging._startTime  # type: ignore[attr-defined]  # (a float before 3.13, then ns)
_START_NS = _start if isinstance(_start, int) else int(_start * 1e9)
_HAS_TASK_NAMES = hasattr(logging, "logAsyncioTasks")  # (3.12+)


class LeanRecord(logging.LogRecord):
    """A ``LogRecord`` with the same attributes, filled with less work: what
    ``logging.logThreads``, ``logProcesses``, ``logMultiprocessing`` and (3.12+)
    ``logAsyncioTasks`` switch off is not looked at, and a caller's file name is taken apart
    only when there is one."""

    def __init__(self, name: str, level: int, pathname: str, lineno: int, msg: Any,
                 args: Any, exc_info: Any, func: str | None = None, sinfo: str | None = None,
                 **kwargs: Any) -> None:
        if (logging.logThreads or logging.logProcesses or logging.logMultiprocessing
                or (_HAS_TASK_NAMES and logging.logAsyncioTasks)):  # type: ignore[attr-defined]
            # (switched back on: the standard record fills them)
            super().__init__(name, level, pathname, lineno, msg, args, exc_info, func, sinfo,
                             **kwargs)
            return
        ct = _time_ns()
        self.name = name
        self.msg = msg
        if args and len(args) == 1 and isinstance(args[0], dict) and args[0]:
            args = args[0]  # (as LogRecord: a single mapping is the mapping)
        self.args = args
        self.levelname = logging.getLevelName(level)
        self.levelno = level
        self.pathname = pathname
        if pathname == _UNKNOWN_FILE:
            self.filename = self.module = pathname
        else:
            self.filename = os.path.basename(pathname)
            self.module = os.path.splitext(self.filename)[0]
        self.exc_info = exc_info
        self.exc_text = None
        self.stack_info = sinfo
        self.lineno = lineno
        self.funcName = func  # type: ignore[assignment]  # (as LogRecord)
        self.created = ct / 1e9
        self.msecs = float((ct % 1_000_000_000) // 1_000_000)
        self.relativeCreated = (ct - _START_NS) / 1e6
        self.thread = self.threadName = None
        self.processName = self.process = None
        if _HAS_TASK_NAMES:
            self.taskName = None


def lean_records() -> None:
    """Records without what the command line's lines never show: no walk up the stack for the
    caller, no thread, process or task names."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if _HAS_TASK_NAMES:
        logging.logAsyncioTasks = False  # type: ignore[attr-defined]
    logging.setLogRecordFactory(LeanRecord)


#: syslog priorities (sd-daemon(3)) from logging's levels, for the journal: a record gets the
#: priority of the highest of these levels that it reaches (DEBUG's below them all)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))


class JournalFormatter(logging.Formatter):
    """Lines for systemd's journal: each starts with its syslog priority (``<4>`` for a
    warning, sd-daemon(3)), so that ``journalctl -p warning`` finds them, and has no date and
    time, which the journal records itself. The lines of a traceback each get the priority."""

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITIES if record.levelno >= level), 7)
        prefix = f"<{priority}>"
        text = f"{record.levelname} {super().format(record)}"
        return prefix + text.replace("\n", "\n" + prefix)


def to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is connected to systemd's journal: a service's standard error is,
    under systemd's default ``StandardError=journal``, which says so in ``JOURNAL_STREAM``
    (the device and inode of that stream, ``DEV:INO``). A stream redirected elsewhere by the
    service's own command is not."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(level: int, stream: TextIO | None = None) -> None:
    """The command line's logging: ``FORMAT`` lines at ``level`` and above to ``stream``
    (standard error), as ``logging.basicConfig(level=level, format=FORMAT)`` would; to
    systemd's journal, lines with their priority and without the time (JournalFormatter)."""
    root = logging.getLogger()
    if not root.handlers:  # (as basicConfig: a process that set up logging keeps it)
        out = stream if stream is not None else sys.stderr
        handler = LineHandler(out)
        handler.setFormatter(JournalFormatter() if to_journal(out) else LineFormatter())
        root.addHandler(handler)
        root.setLevel(level)
    lean_records()


def drop_stdout() -> None:
    """The reader of the command's output has gone (``icafast sessions | head``): send the rest
    of it nowhere, so that neither later lines nor the flush at exit raise BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
