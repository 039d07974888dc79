"""Registered versions as MLflow models: the `python_function` flavour, so that MLflow itself loads and serves them.

    mlflow.pyfunc.load_model("models:/NAME@fastest").predict(images)      # N×C×H×W float32, normalised
    mlflow models serve -m models:/NAME/1 --env-manager local             # POST /invocations {"inputs": images}

A registered version is an MLflow model folder: `MLmodel` (the `python_function` flavour with this module as its
loader, a tensor signature — float32 N×C×H×W images in, float32 logits out — and an input example), and the saved
model (saved.py: `weights.safetensors` + `structure.json`) under `data/`. Loading runs autoprune's own loader on it:
nothing is unpickled and no code is copied into the version (autoprune must be installed where it is loaded); the
model is prepared in the recipe its latency was measured in, as `autoprune.load_model` prepares it, so the two give
the same outputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from autoprune.measure.onnx import ONNX_FILE
from autoprune.saved import MLFLOW_DATA, STRUCTURE_FILE

LOADER_MODULE = "autoprune.tracking.pyfunc"
DATA_FOLDER = MLFLOW_DATA.name  # data_path is copied under data/ by its own name


def save_mlflow_model(saved: str | Path, destination: str | Path, *,
                      input_size: tuple[int, int, int] | None = None) -> Path:
    """Write the MLflow model of the saved model in `saved` to `destination` (which must not exist yet). The
    signature's image size is `input_size`, else the one the model was timed at."""
    import mlflow.pyfunc
    import numpy as np
    import timm
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    import autoprune

    structure = json.loads((Path(saved) / STRUCTURE_FILE).read_text())
    channels, height, width = input_size or structure.get("example_shape", [1, 3, 224, 224])[1:]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, height, width))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, structure["num_classes"]))]))
    staged = Path(destination).parent / f".{Path(destination).name}-{DATA_FOLDER}"
    _copy_folder(Path(saved), staged / DATA_FOLDER)
    quiet = logging.getLogger("mlflow.pyfunc")  # it says "Validating input example" once per version, at INFO
    level, quiet.level = quiet.level, max(quiet.getEffectiveLevel(), logging.WARNING)
    try:
        mlflow.pyfunc.save_model(
            path=str(destination), loader_module=LOADER_MODULE, data_path=str(staged / DATA_FOLDER),
            signature=signature, input_example=np.zeros((1, channels, height, width), dtype=np.float32),
            pip_requirements=[f"autoprune=={autoprune.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"timm=={timm.__version__}", "safetensors"])
    finally:
        quiet.setLevel(level)
        _remove_folder(staged)
    if (Path(saved) / ONNX_FILE).exists():
        _add_onnx_flavor(Path(destination))
    return Path(destination)


def _add_onnx_flavor(folder: Path) -> None:
    """A version timed in ONNX Runtime carries its ONNX file as MLflow's onnx flavour too:
    `mlflow.onnx.load_model(uri)` gives the ONNX model itself, for ONNX Runtime without autoprune."""
    import onnx
    from mlflow.models import Model

    model = Model.load(str(folder / "MLmodel"))
    model.add_flavor("onnx", onnx_version=onnx.__version__, data=f"data/{DATA_FOLDER}/{ONNX_FILE}",
                     providers=["CUDAExecutionProvider", "CPUExecutionProvider"], code=None)
    model.save(str(folder / "MLmodel"))


class AutopruneModel:
    """What `mlflow.pyfunc.load_model` wraps: the prepared model (measure/prepared.py), called on numpy images."""

    def __init__(self, folder: str) -> None:
        from autoprune.saved import load_prepared

        self.prepared = load_prepared(folder)

    def predict(self, model_input, params=None):
        import numpy as np
        import torch

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return self.prepared.logits(images).cpu().numpy()


def _load_pyfunc(data_path: str, model_config=None) -> AutopruneModel:
    """MLflow's entry point (the flavour's `loader_module`): `data_path` is the saved model's folder."""
    return AutopruneModel(data_path)


def _copy_folder(source: Path, destination: Path) -> None:
    import shutil

    shutil.copytree(source, destination)


def _remove_folder(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
