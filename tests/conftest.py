"""Shared test setup: a fixed seed per test, and a deadline that turns a hang into a failure."""

import signal
import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    # Every test draws its random fields and points from the same stream, whatever ran before it.
    torch.manual_seed(0)


@pytest.fixture
def float64():
    """Make float64 the default dtype for one test (restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def cli_in_tmp(monkeypatch, tmp_path):
    """For tests that run the CLI in-process: explicit args only (pytest's are not for it), writing
    under tmp_path, on one thread, as the CLI's subprocesses run: the same arithmetic, bit for bit."""
    monkeypatch.setattr(sys, "argv", ["svflow-ode"])
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deadline():
    """Call ``deadline(seconds)`` to fail the test with ``TimeoutError`` if it runs longer."""

    def _on_alarm(signum, frame):
        raise TimeoutError("the test ran past its deadline: the solve hangs")

    def arm(seconds: float) -> None:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)

    previous = signal.getsignal(signal.SIGALRM)
    yield arm
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def pytest_terminal_summary(terminalreporter):
    """Report how many examples each property-based test ran."""
    from test_properties import EXAMPLES

    if EXAMPLES:
        terminalreporter.write_sep("-", "hypothesis examples run")
        for name, count in sorted(EXAMPLES.items()):
            terminalreporter.write_line(f"{name}: {count}")
