"""The hang detector's arithmetic (no Ray): the deadline and the peers' beat ages. The detector
itself runs against real SIGSTOPped processes in tests/test_ray_pair.py."""
from __future__ import annotations

from orchestrator.topology.split.watchdog import Ages, deadline
from orchestrator.config import HangSpec


def test_deadline_is_the_floor_until_steps_are_slow():
    spec = HangSpec()
    assert deadline(spec.floor_s, spec.step_multiple, []) == 20.0          # nothing measured yet
    assert deadline(spec.floor_s, spec.step_multiple, [0.01, 0.5]) == 20.0  # fast steps: the floor
    assert deadline(spec.floor_s, spec.step_multiple, [0.2, 3.0]) == 30.0   # the slowest worker's steps


def test_a_peer_is_stale_from_its_last_change_and_a_new_process_counts_as_a_beat():
    ages = Ages(now=100.0)
    assert ages.age("r1", 104.0) == 4.0               # never seen: counts from the watchdog's start
    ages.see("r1", ("a", 1), 105.0)
    ages.see("r1", ("a", 1), 130.0)                   # unchanged: no beat
    assert ages.age("r1", 130.0) == 25.0
    ages.see("r1", ("b", 0), 131.0)                   # a restarted peer (new nonce) beats afresh
    assert ages.age("r1", 131.5) == 0.5
    ages.see("r1", None, 140.0)                       # its key gone: no news is no beat
    assert ages.age("r1", 140.0) == 9.0
