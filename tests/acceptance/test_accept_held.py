"""Two things about links a side does not read (PROTOCOL.md 4.7), with real processes and
kernel faults:

- a server that keeps less than its clients would send (``--replay-limit 1M`` against the
  clients' 8M) never stops reading their links, since each client's send window is at most
  what the server announced: before, it stopped reading once its backend fell behind, and
  with an echoing backend the two sides waited on each other for good (the acks that would
  have let the echo flow were in the link it did not read);
- a link the server does not read (a peer that sends beyond what the server announced: only
  another implementation does) still finds a peer that vanished within the dead timeout: its
  silence is no sign then, but the TCP acknowledgements of the keepalives sent on it are. A
  kernel blackhole (iptables DROP in network namespaces) is the fault: the loopback fault
  proxy would go on acknowledging for the client.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from acceptance_rig import PY, NetnsNet, Rig, wait_until

pytestmark = pytest.mark.acceptance

HERE = Path(__file__).parent
CHECK = str(HERE / "stream_check.py")
RAW = str(HERE / "raw_client.py")
NBYTES = 24_000_000
RATE = 50_000_000  # bytes/s: far more than the backend takes while it is held
DEAD = 1.0  # acceptance_rig.FAST's --dead-timeout
DETECT_SLACK = 1.5  # a loaded 2-CPU host may run a timer late
HELD = "the link is not read until it takes them"


def test_a_server_that_keeps_less_than_its_clients_send_never_stalls(rig: Rig,
                                                                     tmp_path: Path) -> None:
    """``icafast serve --replay-limit 1M``, a client with the default 8M, and an echo
    backend that reads nothing at first: the stream's first megabytes wait at the server, the
    link is broken (a blackhole longer than the dead timeout) and the client resumes; then
    the backend reads and echoes. Every byte comes back once, in order, over one backend
    connection, and the server never had to stop reading the link. Before, it stopped, and
    in 2 of 3 runs the stream stalled for good. A checksum mismatch on the first link after
    the resume was also logged in 3 of 4 runs: a second bug, which a link not read exposed
    (the replay went out as views of a ring that new bytes had refilled; see
    test_engine.py::test_a_replay_stays_intact_when_the_peer_acks_it_before_it_is_sent)."""
    port = rig.port()
    go = tmp_path / "read-now"
    echo = rig.spawn("server", "echo", [sys.executable, CHECK, "echo", str(port), str(go)])
    echo.wait_for("listening")
    local = rig.start_relay(port, "--replay-limit", "1M")
    app = rig.spawn("client", "stream-check", [sys.executable, CHECK, "check", str(local),
                                                str(NBYTES), str(RATE)])
    assert rig.server is not None
    rig.server.wait_for("new from", timeout=30)
    time.sleep(1.0)  # (the backend reads nothing: what the client sent waits)
    resumed = rig.resumes()
    rig.fault("blackhole")
    rig.wait_resumes(resumed + 1, timeout=15)
    go.touch()  # the backend reads again
    rc = app.p.wait(60)
    assert rc == 0 and "OK" in app.text(), f"stream check exit {rc}:\n{app.tail()}\n" \
                                           f"{rig.logs()}"
    assert echo.count("connection ") == 1, echo.text()  # one backend connection throughout
    assert rig.new_sessions() == 1, rig.logs()
    log = rig.server.text()
    assert HELD not in log and "checksum mismatch" not in log, rig.logs()
    rig.check_icafast_logs()


def test_a_link_not_read_finds_a_vanished_client_within_the_dead_timeout(rig: Rig,
                                                                          tmp_path: Path) -> None:
    """A hand-made client sends beyond every acknowledgement to a backend that reads
    nothing, so the server stops reading its link; the link is then blackholed at the
    client's end (its segments, and the acknowledgements of the server's, vanish). The
    server finds the link broken within the dead timeout (plus slack), not at TCP's timeout
    minutes later, and shows the session DISCONNECTED. While the client was there, the link
    was not found dead, however long it was not read."""
    if rig.mode != "netns":
        pytest.skip(f"a blackhole that stops TCP acknowledgements needs network namespaces "
                    f"({rig.why})")
    net = rig.net
    assert isinstance(net, NetnsNet)
    port = rig.port()
    echo = rig.spawn("server", "backend", [sys.executable, CHECK, "echo", str(port),
                                           str(tmp_path / "never")])
    echo.wait_for("listening")
    target = rig.start_server(port)
    host, _, link_port = target.rpartition(":")
    raw = rig.spawn("client", "raw-client", [PY, RAW, host, link_port])
    raw.wait_for("sending")
    assert rig.server is not None
    rig.server.wait_for(HELD, timeout=30)
    time.sleep(3 * DEAD)  # not read, with the client there: not found dead
    assert rig.server.count("link lost") == 0, rig.logs()
    with net.blackholed("client"):  # (the client vanishes: the server's segments go unanswered)
        t0 = time.monotonic()
        found = wait_until(lambda: rig.server.count("link lost") > 0, DEAD + DETECT_SLACK)
        took = time.monotonic() - t0
        assert found, f"the link not read was not found broken\n{rig.logs()}"
    print(f"the link not read was found broken after {took:.2f} s")
    log = rig.server.text()
    assert "acknowledged nothing" in log and "state DISCONNECTED" in log, rig.logs()
    rig.check_icafast_logs()
