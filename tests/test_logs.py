"""The command line's log lines (icafast.logs) against the standard logging setup they replace."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from relay_helpers import free_port

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


def _journal_stream(f) -> str:
    st = os.fstat(f.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_lines_to_the_journal_have_a_priority_and_no_time(restored_logging, tmp_path,
                                                          monkeypatch):
    """Under systemd (standard error is the journal, as ``JOURNAL_STREAM`` says) each line
    starts with its syslog priority, which ``journalctl -p`` filters on, and has no date and
    time (the journal has its own). Every line of a traceback gets the priority."""
    with open(tmp_path / "journal", "w+") as out, open(tmp_path / "other", "w+") as other:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(out))
        assert logs.to_journal(out) and not logs.to_journal(other)
        logging.getLogger().handlers[:] = []
        logs.setup(logging.DEBUG, out)
        log = logging.getLogger("icafast.test")
        log.debug("d %d", 1)
        log.info("i")
        log.warning("w")
        log.log(logging.WARNING + 5, "between warning and error")
        log.error("e")
        log.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        out.seek(0)
        lines = out.read().splitlines()
    assert lines[:6] == ["<7>DEBUG d 1", "<6>INFO i", "<4>WARNING w",
                         "<4>Level 35 between warning and error", "<3>ERROR e", "<2>CRITICAL c"]
    assert lines[6] == "<3>ERROR failed" and lines[-1] == "<3>ValueError: boom", lines
    assert len(lines) > 8 and all(line.startswith("<3>") for line in lines[6:]), lines


@pytest.mark.parametrize("value", ["", "nonsense", "1:2", "12"])
def test_lines_elsewhere_keep_their_time(restored_logging, tmp_path, monkeypatch, value):
    """``JOURNAL_STREAM`` unset, unreadable, or naming another file (the service's command
    redirected its standard error): the usual lines, with the time."""
    with open(tmp_path / "log", "w+") as out:
        monkeypatch.setenv("JOURNAL_STREAM", value)
        logging.getLogger().handlers[:] = []
        logs.setup(logging.INFO, out)
        logging.getLogger("icafast.test").info("hello")
        out.seek(0)
        text = out.read()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO hello\n", text), text


def test_serve_under_systemd_writes_journal_lines(tmp_path):
    """The command as a service runs it: standard error is the journal's stream."""
    free = free_port()
    with open(tmp_path / "journal", "w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "icafast", "serve", "--no-tls", "--listen",
                              f"127.0.0.1:{free}", "--backend", "127.0.0.1:9", "--control",
                              str(tmp_path / "control.sock")],
                             stdout=subprocess.DEVNULL, stderr=err,
                             env={**os.environ, "JOURNAL_STREAM": _journal_stream(err)})
        try:
            end = time.monotonic() + 20
            while time.monotonic() < end and "listening on" not in (
                    tmp_path / "journal").read_text():
                time.sleep(0.05)
            os.kill(p.pid, signal.SIGTERM)
            assert p.wait(10) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        err.seek(0)
        lines = err.read().splitlines()
    assert any(line.startswith("<6>INFO ") and "listening on" in line for line in lines), lines
    assert all(re.match(r"<[2-7]>[A-Z]+ ", line) for line in lines), lines
