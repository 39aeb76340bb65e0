"""The command line's log lines (icafast.logs) against the standard logging setup they replace."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icafast import logs


@pytest.fixture
def restored_logging():
    """Undo what logs.setup / lean_records change in the process-wide logging state."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogRecordFactory(), logging._srcfile,
             logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.setLogRecordFactory(saved[2])
    (logging._srcfile, logging.logThreads, logging.logProcesses,
     logging.logMultiprocessing) = saved[3:]


def _record(cls: type, created: float, msg: str, args: tuple, level: int = logging.INFO,
            pathname: str = "(unknown file)") -> logging.LogRecord:
    r = cls("icafast", level, pathname, 0, msg, args, None, "(unknown function)")
    r.created = created
    r.msecs = float(int((created - int(created)) * 1000))
    return r


@given(created=st.floats(min_value=1e9, max_value=4e9),
       later=st.floats(min_value=0.0, max_value=3.0),
       level=st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]),
       text=st.text(max_size=40), n=st.integers())
def test_lines_are_the_standard_formatters(created, later, level, text, n):
    """Byte for byte what logging.Formatter(FORMAT) writes, also for a second line in the same
    or a later second (the date and time part is kept between lines)."""
    ours, std = logs.LineFormatter(), logging.Formatter(logs.FORMAT)
    for t in (created, created + later):
        r = _record(logging.LogRecord, t, "session %s: %d bytes", (text, n), level)
        assert ours.format(r) == std.format(r)


def test_a_traceback_is_formatted_the_standard_way():
    ours, std = logs.LineFormatter(), logging.Formatter(logs.FORMAT)
    try:
        raise ValueError("boom")
    except ValueError:
        r = logging.LogRecord("icafast", logging.ERROR, "(unknown file)", 0, "failed %s", ("x",),
                              sys.exc_info(), "f")
    r.created, r.msecs = 1.7e9, 5.0
    assert ours.format(r) == std.format(r)
    assert "ValueError: boom" in ours.format(r)


@pytest.mark.parametrize("pathname", ["(unknown file)", "/srv/app/icafast/aio/server.py"])
def test_lean_records_have_the_standard_attributes(restored_logging, pathname):
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    args = ("abc", 3)
    lean = logs.LeanRecord("icafast", logging.INFO, pathname, 7, "s %s %d", args, None, "fn")
    std = logging.LogRecord("icafast", logging.INFO, pathname, 7, "s %s %d", args, None, "fn")
    timing = {"created", "msecs", "relativeCreated"}
    assert {k: v for k, v in vars(lean).items() if k not in timing} == \
        {k: v for k, v in vars(std).items() if k not in timing}
    assert abs(lean.created - std.created) < 1.0
    assert 0 <= lean.msecs < 1000 and lean.msecs == int(lean.msecs)
    assert abs(lean.relativeCreated - std.relativeCreated) < 1000.0
    mapping = logs.LeanRecord("icafast", logging.INFO, pathname, 7, "%(a)s", ({"a": 1},), None)
    assert mapping.getMessage() == "1"


def test_lean_records_fill_thread_names_when_switched_back_on(restored_logging):
    logging.logThreads = True
    r = logs.LeanRecord("icafast", logging.INFO, "(unknown file)", 0, "m", (), None)
    assert r.threadName is not None and r.thread is not None
    r = logs.LeanRecord("icafast", logging.INFO, "(unknown file)", 0, "%(a)s", ({"a": 1},), None)
    assert r.getMessage() == "1" and r.threadName is not None  # (a single mapping, as usual)


def test_setup_writes_lines_at_the_level_and_keeps_an_existing_setup(restored_logging):
    root = logging.getLogger()
    root.handlers[:] = []
    out = io.StringIO()
    logs.setup(logging.INFO, out)
    log = logging.getLogger("icafast.test")
    log.debug("hidden")
    log.info("session %s: new", "ab")
    line = out.getvalue()
    assert line.endswith(" INFO session ab: new\n") and line.count("\n") == 1
    assert line[:4].isdigit() and line[19:20] == ","  # "YYYY-MM-DD HH:MM:SS,mmm"
    assert logging.getLogRecordFactory() is logs.LeanRecord
    other = io.StringIO()
    logs.setup(logging.DEBUG, other)  # (as basicConfig: handlers already there are kept)
    log.info("again")
    assert other.getvalue() == "" and out.getvalue().endswith(" INFO again\n")
    assert root.level == logging.INFO


@pytest.mark.parametrize("argv,level", [
    ([], logging.INFO), (["-v"], logging.DEBUG), (["-vv"], logging.DEBUG),
    (["-q"], logging.WARNING),
])
@pytest.mark.parametrize("command", ["serve", "connect"])
def test_verbose_gives_debug_lines(restored_logging, command, argv, level):
    """serve's and connect's -v was documented as "more logging" and changed nothing (INFO is
    their default level; only -vv gave DEBUG)."""
    from icafast import cli

    logging.getLogger().handlers[:] = []
    args = cli.build_parser().parse_args([command, *argv])
    cli.setup_logging(args)
    assert logging.getLogger().level == level
