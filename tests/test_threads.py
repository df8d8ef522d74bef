"""torch's thread count at start-up (core.threads): TORCH_THREADS wins and skips the probe; the
probe picks a valid count and leaves torch's setting as it was. No timing is asserted."""
from __future__ import annotations

import pytest
import torch

from core import threads


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not chosen yet; torch's count restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_CHOSEN", None)
    yield
    torch.set_num_threads(before)


def test_the_env_count_is_used_without_a_probe(fresh, monkeypatch):
    monkeypatch.setenv("TORCH_THREADS", "1")
    monkeypatch.setattr(threads, "probe_threads", lambda: pytest.fail("probed despite TORCH_THREADS"))
    assert threads.configure_threads() == 1
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("TORCH_THREADS", "2")
    assert threads.configure_threads() == 1  # chosen once per process


def test_a_given_count_wins_over_the_env(fresh, monkeypatch):
    monkeypatch.setenv("TORCH_THREADS", "2")
    assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_env_count_is_refused(fresh, monkeypatch, value):
    monkeypatch.setenv("TORCH_THREADS", value)
    with pytest.raises(ValueError, match="TORCH_THREADS must be a whole number"):
        threads.configure_threads()


def test_the_probe_picks_one_thread_or_the_default_and_changes_nothing(fresh, monkeypatch):
    torch.set_num_threads(2)
    assert threads.probe_threads(budget_s=0.05) in (1, 2)
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("TORCH_THREADS", raising=False)
    chosen = threads.configure_threads()
    assert chosen in (1, 2) and torch.get_num_threads() == chosen
