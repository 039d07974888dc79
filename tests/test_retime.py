"""The search's final re-timing, without Ray: which trials are timed again, and how its pass lands on the records."""

from __future__ import annotations

import math

import pytest

from autoprune.config import HealConfig, PruneConfig, TrialConfig
from autoprune.driver.retime import candidates
from autoprune.measure.timing import LatencyProfile
from autoprune.result import TrialRecord, TrialResult
from autoprune.tracking.final import FinalTiming, apply_final, load_final, save_final

SCALE = 10.0  # the dense latency the trials' speedups were put on


def _profile(speedup: float, half: float = 0.02, **changes) -> LatencyProfile:
    paired = speedup != 1.0 or changes.pop("paired", True)
    fields = dict(median_ms=SCALE / speedup, p90_ms=SCALE / speedup * 1.1, spread=0.1, batch_size=8,
                  dtype="float32", device="cpu: test (1 thread)", threads=1, repeats=20, input_size=(3, 32, 32),
                  torch_version="x", speedup=speedup, speedup_low=speedup * (1 - half) if paired else 1.0,
                  speedup_high=speedup * (1 + half) if paired else 1.0, reference_ms=SCALE if paired else 0.0,
                  log_ratios=(math.log(speedup),) * 6 if paired else ())
    return LatencyProfile(**{**fields, **changes})


def _record(trial: str, accuracy: float | None, latency: LatencyProfile, method: str = "structured") -> TrialRecord:
    config = TrialConfig(PruneConfig(method, {"all": 0.5}), HealConfig("none"))
    result = TrialResult(config, accuracy, latency, macs=1, params=1, sparsity=0.5, timings={})
    return TrialRecord(trial, result, model_dir=f"/models/{trial}")


DENSE = TrialResult(TrialConfig(PruneConfig("none"), HealConfig("none")), 0.90, _profile(1.0, paired=False), 1, 1,
                    0.0, {})


def test_the_trials_near_the_front_are_timed_again_and_the_beaten_ones_not():
    fast = _record("fast", 0.80, _profile(2.0))
    close = _record("close", 0.79, _profile(1.98, half=0.05))  # its interval reaches past `fast`: may beat it
    beaten = _record("beaten", 0.70, _profile(1.5))  # slower than `fast` at its fastest, and less accurate
    unhealed = _record("unhealed", None, _profile(3.0))  # stopped after profiling: no accuracy to publish
    masked = _record("masked", 0.91, _profile(1.0, paired=False), method="magnitude")  # more accurate than dense
    chosen = [r.trial_id for r in candidates([fast, close, beaten, unhealed, masked], DENSE)]
    assert chosen[0] == "fast" and set(chosen) == {"fast", "close", "masked"}  # the front first


def test_the_final_pass_is_the_scale_of_every_latency(tmp_path):
    fast, other = _record("fast", 0.80, _profile(2.0)), _record("other", 0.70, _profile(1.25))
    masked = _record("masked", 0.91, _profile(1.0, paired=False), method="magnitude")
    final_dense = _profile(1.0, paired=False, median_ms=8.0)
    final = FinalTiming(final_dense, {"fast": _profile(2.1, median_ms=8.0 / 2.1, reference_ms=8.0),
                                      "masked": final_dense})
    records, dense = apply_final(final, [fast, other, masked], DENSE)
    by_id = {r.trial_id: r.result for r in records}
    assert dense.latency.median_ms == 8.0 and dense.accuracy == DENSE.accuracy
    assert by_id["fast"].latency.median_ms == pytest.approx(8.0 / 2.1)  # timed again: the final pass's number
    assert by_id["fast"].searched_latency_ms == pytest.approx(SCALE / 2.0)  # its own is kept beside it
    assert by_id["other"].latency.median_ms == pytest.approx(8.0 / 1.25)  # its speedup on the final scale
    assert by_id["masked"].latency == dense.latency  # the dense model's twin: the dense model's measurement
    save_final(final, str(tmp_path))
    assert load_final(str(tmp_path)) == final  # `autoprune publish` reads the same numbers back
    assert load_final(str(tmp_path / "nowhere")) is None
    assert apply_final(None, [fast], DENSE) == ([fast], DENSE)
    assert TrialResult.from_dict(by_id["fast"].to_dict()) == by_id["fast"]


def test_a_busy_node_is_said_before_the_trials_are_timed():
    from autoprune.driver.preflight import warn_if_busy

    busy = {"load_1m": 3.0, "cpus": 2, "busy_processes": 2, "cpu_busy_share": 1.0, "steal_share": 0.0, "seconds": 1}
    said: list[str] = []
    warn_if_busy(_profile(1.0, paired=False, conditions=busy, threads=2), said.append, "the trial worker's node")
    assert len(said) == 1 and "2 other busy processes" in said[0] and "2 threads" in said[0]
    quiet = {**busy, "load_1m": 0.1, "busy_processes": 0}
    warn_if_busy(_profile(1.0, paired=False, conditions=quiet), said.append, "the trial worker's node")
    warn_if_busy(_profile(1.0, paired=False), said.append, "a profile saved before conditions were recorded")
    assert len(said) == 1
