"""Faults that reach only one side, with kernel faults in network namespaces: the link dropped
in one direction only (client -> server, then server -> client) for longer than the dead
timeout, and a client whose address changes mid-session (roaming). A checked byte stream runs
through ``icafast connect`` -> ``icafast serve`` -> an echo backend meanwhile: every byte is
compared with what was sent at its offset, so a byte lost, duplicated or reordered either way
fails the test, and the backend must see one connection only.

The loopback fault proxy cannot drop one direction or move the client, so these run with
network namespaces only (root, ``ip netns``, iptables)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from acceptance_rig import BLACKHOLE_S, NetnsNet, Rig, run_bounded, wait_until

pytestmark = pytest.mark.acceptance

CHECK = str(Path(__file__).with_name("stream_check.py"))
RATE = 1_250_000  # bytes/s each way: the stream runs about 8 s, through all three faults
NBYTES = 10_000_000
DEAD = 1.0  # acceptance_rig.FAST's --dead-timeout
DETECT_SLACK = 1.5  # a loaded 2-CPU host may run a timer late


def test_one_way_drops_and_a_roaming_client(rig: Rig) -> None:
    """Drop client -> server only, then server -> client only (each outlasting the dead
    timeout), then move the client to a new address: the server finds each broken link
    within the dead timeout (plus slack), the client resumes the same session each time
    (from the new address after the move), and the stream arrives intact."""
    if rig.mode != "netns":
        pytest.skip(f"one-way drops and roaming need network namespaces ({rig.why})")
    net = rig.net
    assert isinstance(net, NetnsNet)
    port = rig.port()
    echo = rig.spawn("server", "echo", [sys.executable, CHECK, "echo", str(port)])
    echo.wait_for("listening")
    local = rig.start_relay(port)
    app = rig.spawn("client", "stream-check", [sys.executable, CHECK, "check", str(local),
                                                str(NBYTES), str(RATE)])
    app.wait_for("progress")
    assert rig.server is not None

    def iptables(op: str, *rule: str) -> None:
        run_bounded([*net.prefix("server"), "iptables", "-w", "5", op, *rule])

    detected: list[tuple[str, float]] = []
    for name, rule in (("client->server", ["INPUT", "-i", net.srv_if, "-j", "DROP"]),
                       ("server->client", ["OUTPUT", "-o", net.srv_if, "-j", "DROP"])):
        assert app.alive(), f"the stream ended before the {name} drop:\n{app.tail()}"
        lost, resumed = rig.server.count("link lost"), rig.resumes()
        t0 = time.monotonic()
        iptables("-I", *rule)
        try:
            found = wait_until(lambda: rig.server.count("link lost") > lost,  # noqa: B023
                          DEAD + DETECT_SLACK)
            detected.append((name, round(time.monotonic() - t0, 2)))
            assert found, f"{name} dropped: the server did not find the link broken\n" \
                          f"{rig.logs()}"
            time.sleep(max(0.0, BLACKHOLE_S - (time.monotonic() - t0)))
        finally:
            iptables("-D", *rule)
        rig.wait_resumes(resumed + 1, timeout=10)
    print(f"broken links found after: {detected}")

    # roaming: the client's address changes (the old one is gone, as on another network)
    assert app.alive(), f"the stream ended before the move:\n{app.tail()}"
    base = net.client_ip.rsplit(".", 1)[0]
    new_ip = f"{base}.6"
    resumed = rig.resumes()
    run_bounded(["ip", "-n", net.cli_ns, "addr", "del", f"{net.client_ip}/30", "dev",
                 net.cli_if])
    run_bounded(["ip", "-n", net.cli_ns, "addr", "add", f"{new_ip}/29", "dev", net.cli_if])
    run_bounded(["ip", "-n", net.srv_ns, "route", "add", f"{new_ip}/32", "dev", net.srv_if])
    rig.wait_resumes(resumed + 1, timeout=10)
    assert f"resumed from {new_ip}:" in rig.server.text(), rig.logs()

    rc = app.p.wait(60)
    assert rc == 0 and "OK" in app.text(), f"stream check exit {rc}:\n{app.tail()}\n" \
                                           f"{rig.logs()}"
    assert echo.count("connection ") == 1, echo.text()  # one backend connection throughout
    assert rig.new_sessions() == 1, rig.logs()
    rig.check_icafast_logs()
