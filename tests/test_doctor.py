"""`autoprune doctor` on this machine: every check runs, every trial path passes, GPU rows say there is no GPU."""

from __future__ import annotations

import json

import pytest
import torch

from autoprune.cli import main

pytestmark = pytest.mark.e2e


def test_doctor_passes_here_and_says_what_it_could_not_check(local_ray, tmp_path, capsys):
    assert main(["doctor", "--workdir", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {(row["area"], row["name"]): row for row in rows}
    trials = [row for row in rows if row["area"] == "trial" and "DeepSpeed" not in row["name"]]
    assert len(trials) == 6 and all(row["status"] == "ok" for row in trials), trials  # vit/resnet × 3 paths
    assert all("reloaded in its recipe" in row["detail"] for row in trials)
    assert by_name[("ray", "cluster")]["status"] == "ok" and by_name[("mlflow", "tracking")]["status"] == "ok"
    assert by_name[("storage", "trial checkpoints")]["status"] == "ok"
    if not torch.cuda.is_available():
        for key in (("gpu", "visible GPUs"), ("gpu", "2:4 sparse kernels"), ("gpu", "NCCL")):
            assert by_name[key]["status"] == "skipped", by_name[key]
        assert "bfloat16" in next(row["detail"] for row in trials)  # bf16 profiles where supported: the CPU runs it


def test_doctor_fails_with_the_reason_when_a_check_fails(local_ray, tmp_path, capsys):
    # an http tracking URI nothing listens on: the tracking row fails, the rest still run, the exit status says so
    assert main(["doctor", "--workdir", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9"]) == 1
    out = capsys.readouterr().out
    assert "mlflow       tracking" in out and "FAILED" in out and "does not answer" in out
    assert "failed" in out.splitlines()[-1]
