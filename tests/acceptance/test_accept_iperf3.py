"""iperf3 through icafast: the iperf3 server is the backend; the client runs a bidirectional
test with parallel streams (a control connection plus one data connection per stream and
direction, all relayed at once) while the link breaks under it."""

from __future__ import annotations

import json
import time

import pytest
from acceptance_rig import Rig, need

pytestmark = pytest.mark.acceptance

STREAMS = 2
SESSIONS = 1 + 2 * STREAMS  # control + STREAMS data connections each way (--bidir)
SCHEDULE = ["reset", "blackhole", "reset", "outage", "reset"]


def test_iperf3_bidir_parallel_through_link_kills(rig: Rig) -> None:
    """``iperf3 --bidir -P 2`` (5 connections at once) runs 12 s while every link is reset
    three times, blackholed and taken down; it completes with exit 0 and reports bytes both
    ways, and the server relayed exactly 5 sessions: no break turned into a new connection."""
    progs = need("iperf3")
    port = rig.port()
    srv = rig.spawn("server", "iperf3-server", [progs["iperf3"], "-s", "-B", "127.0.0.1",
                                                "-p", str(port)])
    rig.wait_listening("server", port, srv)
    local = rig.start_relay(port)
    client = rig.spawn("client", "iperf3-client", [
        progs["iperf3"], "-c", "127.0.0.1", "-p", str(local), "-t", "12", "-P", str(STREAMS),
        "--bidir", "-J", "--connect-timeout", "10000"])
    done: list[tuple[str, int]] = []
    try:
        end = time.monotonic() + 30
        while rig.new_sessions() < SESSIONS and time.monotonic() < end and client.alive():
            time.sleep(0.02)
        assert rig.new_sessions() == SESSIONS, f"iperf3 did not connect\n{rig.logs()}"
        time.sleep(1.0)  # let the streams get going
        for kind in SCHEDULE:
            if not client.alive():
                break
            # every link breaks, and all must resume before the next break
            killed = rig.fault_and_recover(kind, SESSIONS, alive=client.alive)
            if client.alive():
                done.append((kind, killed))
            time.sleep(0.5)
        rc = client.p.wait(60)
    finally:
        print(f"breaks while iperf3 ran: {done}")
    text = client.text()
    assert rc == 0, f"iperf3 exit {rc}:\n{text[-3000:]}\n{rig.logs()}"
    report = json.loads(text)
    assert "error" not in report, report["error"]
    e = report["end"]
    sums = {k: e[k]["bytes"] for k in ("sum_sent", "sum_received", "sum_sent_bidir_reverse",
                                       "sum_received_bidir_reverse")}
    print(f"iperf3 bytes: {sums}")
    assert all(v > 1_000_000 for v in sums.values()), sums
    assert len(done) == len(SCHEDULE), f"breaks while iperf3 ran: {done}"
    assert all(n == SESSIONS for k, n in done if k == "reset"), done  # each hit every link
    assert rig.resumes() >= SESSIONS * len(SCHEDULE)
    assert rig.new_sessions() == SESSIONS, "a break made a new session instead of resuming"
    rig.check_icafast_logs()
