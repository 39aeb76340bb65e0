"""Fixtures of the acceptance tests; the machinery is in acceptance_rig.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from acceptance_rig import Rig, net_mode, skipped_reasons


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        print(f"[network: {r.mode} ({r.why}); faults: "
              f"{[(k, n) for k, _t, n in r.faults]}]\n{r.logs()}")
        r.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if net_mode.cache_info().currsize:
        mode, why = net_mode()
        terminalreporter.write_line(f"acceptance tests: link faults via {mode} ({why})",
                                    yellow=mode != "netns")
    for msg in dict.fromkeys(skipped_reasons):
        terminalreporter.write_line(msg, red=True, bold=True)
