"""Our launcher's ranks (`LocalRanks`) name the rank whose end failed the run (issue 25).

Started without mpirun, a rank whose collective fails because another rank ended (Horovod shut
down, gloo's connection reset) notices before the launcher can end it. It says one line and exits
PEER_GONE_EXIT, and the launcher gives the run the status of the rank that caused it. Real
processes stand in for the ranks here; tests/data/test_integrity.py runs two real ones.
"""
from __future__ import annotations

import subprocess
import sys
import time

from pipeline.runtime.launch import PEER_GONE_EXIT, PEER_GONE_GRACE_S, LocalRanks


def _ranks(*scripts: str) -> LocalRanks:
    ranks = LocalRanks.__new__(LocalRanks)  # the ranks' processes, not `python -m hpcforge`
    ranks.procs = [subprocess.Popen([sys.executable, "-c", s], start_new_session=True)
                   for s in scripts]
    ranks.failed, ranks._failed_at, ranks._ended, ranks._server = None, 0.0, False, None
    return ranks


def _status(ranks: LocalRanks) -> int:
    while (code := ranks.poll()) is None:
        time.sleep(0.05)
    return code


def test_a_rank_that_failed_because_a_peer_ended_gives_way_to_that_peer():
    """Rank 0 exits PEER_GONE_EXIT first; rank 1, whose error caused it, exits 2 a little later:
    the run's status is 2 and rank 1 is the one named (before: 3, and rank 1 killed)."""
    ranks = _ranks(f"import sys; sys.exit({PEER_GONE_EXIT})",
                   "import sys, time; time.sleep(0.5); sys.exit(2)")
    assert _status(ranks) == 2 and ranks.failed == (1, 2)
    assert ranks.how() == "exit status 2"


def test_a_real_failure_ends_the_other_ranks_at_once():
    ranks = _ranks("import sys; sys.exit(2)", "import time; time.sleep(60)")
    t0 = time.monotonic()
    assert _status(ranks) == 2 and ranks.failed == (0, 2)
    assert ranks.procs[1].returncode < 0 and time.monotonic() - t0 < PEER_GONE_GRACE_S


def test_a_peer_gone_rank_alone_ends_the_others_after_the_grace():
    ranks = _ranks(f"import sys; sys.exit({PEER_GONE_EXIT})", "import time; time.sleep(60)")
    t0 = time.monotonic()
    assert _status(ranks) == PEER_GONE_EXIT and ranks.procs[1].returncode < 0
    assert PEER_GONE_GRACE_S <= time.monotonic() - t0 < 30
