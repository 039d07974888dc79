"""A search's final re-timing as a record (driver/retime.py measures it): saved beside the search's Tune run, read
back by `autoprune publish`, and applied to the trials so that every latency of the search is on its scale."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from autoprune.measure.timing import LatencyProfile, rescaled
from autoprune.result import TrialRecord, TrialResult

FINAL_FILE = "final_timing.json"  # beside the Tune run's own files


@dataclass(frozen=True)
class FinalTiming:
    """The final pass: the dense model's profile and each re-timed trial's, by trial id."""

    dense: LatencyProfile
    trials: Mapping[str, LatencyProfile]

    def to_json(self) -> str:
        return json.dumps({"dense": self.dense.as_dict(),
                           "trials": {trial: profile.as_dict() for trial, profile in self.trials.items()}})

    @classmethod
    def from_json(cls, text: str) -> "FinalTiming":
        raw = json.loads(text)
        return cls(LatencyProfile.from_dict(raw["dense"]),
                   {trial: LatencyProfile.from_dict(fields) for trial, fields in raw["trials"].items()})


def apply_final(final: FinalTiming | None, records: Sequence[TrialRecord],
                dense: TrialResult) -> tuple[list[TrialRecord], TrialResult]:
    """The records and the dense result on the final pass's scale: re-timed trials get their new profile (the old
    median kept as `searched_latency_ms`), those of the dense structure the final dense profile, the others their
    speedup put on the final dense latency."""
    if final is None:
        return list(records), dense
    scale = final.dense.median_ms
    dense_key = dense.latency_keys.get(dense.latency.batch_size)
    out = []
    for record in records:
        result = record.result
        if result is not None:
            # a trial of the dense structure on the dense kernels (masks) shares the dense model's one measurement,
            # on the final scale as during the search: not its own rescaled copy, whose p90 would differ
            same_as_dense = dense_key is not None and result.latency_keys.get(result.latency.batch_size) == dense_key
            latency = final.trials.get(record.trial_id) or (final.dense if same_as_dense
                                                            else rescaled(result.latency, scale))
            result = replace(result, latency=latency, searched_latency_ms=result.latency.median_ms)
        out.append(replace(record, result=result))
    return out, replace(dense, latency=final.dense)


def save_final(final: FinalTiming, path: str) -> None:
    """Beside the Tune run at `path` (a local folder or a storage URI Tune writes to)."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(_uri(path))
    with filesystem.open_output_stream(f"{root.rstrip('/')}/{FINAL_FILE}") as stream:
        stream.write(final.to_json().encode())


def load_final(path: str) -> FinalTiming | None:
    """The final pass saved beside the Tune run at `path`; None when the search saved none."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(_uri(path))
    try:
        with filesystem.open_input_stream(f"{root.rstrip('/')}/{FINAL_FILE}") as stream:
            return FinalTiming.from_json(stream.read().decode())
    except (FileNotFoundError, OSError):
        return None


def _uri(path: str) -> str:
    """A local path as a file URI (pyarrow reads a bare path only when it is absolute)."""
    return path if "://" in path else Path(path).resolve().as_uri()
