"""Registered versions are MLflow models: `mlflow.pyfunc.load_model` and `mlflow models serve` (real MLflow, a real
scoring server on loopback) give what `autoprune.load_model` gives — for a bf16 channels-last BatchNorm CNN and a
ViT — and autoprune's own loader reads the MLflow folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest
import torch
from conftest import TINY_RESNET, TINY_VIT

from autoprune.measure.formats import ExecutionRecipe
from autoprune.saved import load_model_dir, save_model, saved_recipe
from autoprune.testing.loopback import LOOPBACK, free_port
from autoprune.tracking.pyfunc import save_mlflow_model

RECIPES = {"resnet-bn": (TINY_RESNET, ExecutionRecipe(dtype="bfloat16", memory_format="channels_last")),
           "vit": (TINY_VIT, ExecutionRecipe())}


def _mlflow_model(name: str, bundle, folder):
    source, recipe = RECIPES[name]
    torch.manual_seed(0)
    save_model(source.create().eval(), source, folder / "saved", recipe=recipe, example_shape=(4, *bundle.input_size))
    return save_mlflow_model(folder / "saved", folder / "mlflow-model"), folder / "saved"


@pytest.fixture(params=list(RECIPES), ids=list(RECIPES))
def mlflow_model(request, bundle, tmp_path):
    return _mlflow_model(request.param, bundle, tmp_path)


def test_mlflow_loads_the_version_and_predicts_what_autoprune_does(mlflow_model, bundle):
    import mlflow.pyfunc

    folder, saved = mlflow_model
    images = bundle.normalize(bundle.eval.images[:6])
    with torch.no_grad():
        expected = load_model_dir(saved)(images).float().numpy()
    predicted = mlflow.pyfunc.load_model(str(folder)).predict(images.numpy())
    assert predicted.dtype == np.float32 and predicted.shape == expected.shape
    assert np.abs(predicted - expected).max() <= 1e-6
    # autoprune's own loader reads the MLflow model's folder (what `best(load=True)` downloads)
    assert saved_recipe(folder) == saved_recipe(saved)
    with torch.no_grad():
        assert np.abs(load_model_dir(folder)(images).float().numpy() - expected).max() <= 1e-6


def test_mlflow_models_serve_answers_with_the_same_logits(bundle, tmp_path):
    """`mlflow models serve --env-manager local` (MLflow's scoring server, in its own process) on the bf16
    channels-last CNN's version."""
    folder, saved = _mlflow_model("resnet-bn", bundle, tmp_path)
    images = bundle.normalize(bundle.eval.images[:3])
    with scoring_server(str(folder)) as predict:
        answer = predict(images)
    with torch.no_grad():
        expected = load_model_dir(saved)(images).float().numpy()
    assert answer.shape == expected.shape and np.abs(answer - expected).max() <= 1e-5


@contextmanager
def scoring_server(model_uri: str, **env: str) -> Iterator:
    """`mlflow models serve -m MODEL_URI --env-manager local` on a loopback port, in its own process (`env` added to
    its environment); yields a function that POSTs images to its /invocations and returns its predictions."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-h",
         LOOPBACK, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # MLflow's scoring server is `uvicorn`, run from PATH: the one beside this Python
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **env,
             "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"},
        start_new_session=True)

    def predict(images: torch.Tensor) -> np.ndarray:
        request = urllib.request.Request(f"http://{LOOPBACK}:{port}/invocations", method="POST",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)

    try:
        _wait_until_ready(f"http://{LOOPBACK}:{port}/ping", server)
        yield predict
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _wait_until_ready(url: str, server: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve ended ({server.returncode}): {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer {url} within {timeout_s} s")
