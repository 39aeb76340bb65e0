"""Shared fixtures: run the core tests against both implementations.

``core`` is parametrized over the compiled extension (``icafast._core``, id "cython") and its
pure-Python twin (``icafast._pure``, id "python"), imported directly so that the tests do not
depend on which one ``icafast`` picked. The "cython" cases are skipped when the extension is not
built, or when pytest is run with ``--no-c-extensions``.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

# No deadlines: timing on a shared VM is noise, and the tests assert nothing about speed.
settings.register_profile(
    "icafast",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("icafast"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "icafast"))


def pytest_configure(config: pytest.Config) -> None:
    """Tracebacks that a test dumps when it is stuck (``relay_helpers.run_async``) go where
    pytest's own fault handler writes: a copy of the terminal's stderr, not the capture of
    the test's output, which is lost when the dump ends the process."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key
    except ImportError:  # pragma: no cover - another pytest: the test's stderr, as before
        return
    import relay_helpers

    relay_helpers.stuck_dump_fd = lambda: config.stash.get(fault_handler_stderr_fd_key, None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-c-extensions",
        action="store_true",
        default=False,
        help="skip the compiled core (icafast._core) and test only the pure-Python twin",
    )


def compiled_core(config: pytest.Config) -> ModuleType:
    """``icafast._core``, or skip the test (not built, or --no-c-extensions)."""
    if config.getoption("--no-c-extensions"):
        pytest.skip("--no-c-extensions given")
    try:
        from icafast import _core  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - depends on the build
        pytest.skip(f"compiled core icafast._core is not built: {exc}")
    if getattr(_core, "IMPLEMENTATION", None) != "cython":  # ICAFAST_PURE_PYTHON=1 aliases it
        pytest.skip("the pure-Python core runs here (ICAFAST_PURE_PYTHON=1)")
    return _core


@pytest.fixture(scope="session", params=["cython", "python"])
def core(request: pytest.FixtureRequest) -> ModuleType:
    """Each core implementation in turn (session scoped: modules carry no per-test state)."""
    if request.param == "cython":
        return compiled_core(request.config)
    from icafast import _pure

    return _pure


@pytest.fixture(scope="session")
def ccore(request: pytest.FixtureRequest) -> ModuleType:
    """The compiled core (skips when unavailable); for differential tests."""
    return compiled_core(request.config)


@pytest.fixture(scope="session")
def pcore() -> ModuleType:
    """The pure-Python core: the oracle of the differential tests."""
    from icafast import _pure

    return _pure


@pytest.fixture(autouse=True)
def _no_fatal_transport_errors(caplog: pytest.LogCaptureFixture):
    """Fail any test during which an event loop reported a fatal error on a transport (an
    exception escaped one of our protocol callbacks): the loop closes that connection and
    goes on, so nothing else would notice."""
    yield
    fatal = [r.getMessage().splitlines()[0] for r in caplog.get_records("call")
             if "Fatal error on transport" in r.getMessage()
             or "Fatal error: protocol" in r.getMessage()]
    assert not fatal, fatal
