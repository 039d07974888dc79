"""Serve the model that `autoprune best` selects: a Ray Serve application over HTTP.

    autoprune serve --model deit-small-pruned --max-latency-ms 5 --tracking-uri http://mlflow:5000
    serve run autoprune.serve:app model=deit-small-pruned max_latency_ms=5        # Ray Serve's own CLI

The replica picks the version once, at start (the most accurate one within the latency target, as `best` does),
loads it from the registry without unpickling anything, prepared in the recipe its latency was measured in (dtype,
memory format, 2:4 kernels, compiled; on the kind of device it was measured on, with as many CPU threads) and warmed
on the batch it was measured at before it reports ready, and
answers POST / with a JSON body `{"images": [N × C × H × W floats, normalised as in training]}` by `{"top1": [...],
"logits": [[...]], "model": name, "version": v}`. Concurrent requests are batched (up to the batch size the latency
was measured at), so a replica runs the batch the Pareto front was measured for. GET / describes the model served.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from ray import serve

from autoprune.errors import AutopruneError


@serve.deployment(name="autoprune")
class PrunedModel:
    def __init__(self, model: str, max_latency_ms: float, tracking_uri: str | None = None,
                 device: str | None = None, conditions: dict | None = None) -> None:
        from autoprune.tracking.select import best, load_served

        # conditions: the measurement conditions to choose among (device, batch_size, dtype, runtime), as `best`
        # takes them
        self.choice = best(model=model, max_latency_ms=max_latency_ms, tracking_uri=tracking_uri,
                           **(conditions or {}))
        if not self.choice.on_gpu and self.choice.threads:
            torch.set_num_threads(self.choice.threads)  # as many threads as it was timed with
        # prepared as it was timed (measure/prepared.py), its first call guarded and warmed on the measured batch:
        # the replica reports ready after this, so no request pays a compile or the first kernels' set-up
        self.model = load_served(self.choice.model_uri, tracking_uri=tracking_uri, device=device)
        self.predict.set_max_batch_size(max(1, int(self.choice.batch_size)))

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.005)
    async def predict(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [len(images) for images in batches]
        # in batches of the measured size; a compiled model's short batch is padded to it, so that the graph it
        # compiled runs (a batch of another shape would compile again); its hook casts the images to its recipe
        logits = self.model.logits(torch.cat(batches)).cpu()
        return list(torch.split(logits, sizes))

    async def __call__(self, request) -> dict[str, Any]:
        if request.method == "GET":
            return self.choice.as_dict()
        body = await request.json()
        images = torch.as_tensor(body["images"], dtype=torch.float32)
        if images.dim() == 3:
            images = images.unsqueeze(0)
        logits = await self.predict(images)
        return {"top1": logits.argmax(-1).tolist(), "logits": logits.tolist(), "model": self.choice.name,
                "version": self.choice.version}


# What a replica needs to read the registry as this process does. A replica runs on some node of the cluster, in an
# environment of its own: a team's tracking server with a login would refuse it without these.
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                      "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH")


def replica_options(choice, *, device: str | None = None, cluster: Mapping[str, float] | None = None) -> dict:
    """Ray actor options of a replica that runs the chosen version as it was measured (a GPU, or as many CPUs as
    threads) — or on the `device` asked for — with this process's MLflow credentials in its environment. A replica
    that needs a GPU the cluster (`ray.cluster_resources()`) does not have is refused here: Ray would wait for one
    for ever while the command said it was serving."""
    on_gpu = device.startswith("cuda") if device else choice.on_gpu
    if on_gpu and cluster is not None and cluster.get("GPU", 0) < 1:
        measured = f"was measured on {choice.device}" if choice.on_gpu else "is asked to run on cuda"
        raise AutopruneError(
            f"{choice.name!r} version {choice.version} {measured}, and this Ray cluster has no GPU: its replica"
            " could never start. Serve it on the CPU with --device cpu (it will not run at its registered latency),"
            " or on a cluster with a GPU (--address).")
    options: dict = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": max(1, choice.threads)}
    credentials = {name: os.environ[name] for name in MLFLOW_CREDENTIALS if os.environ.get(name)}
    if credentials:
        options["runtime_env"] = {"env_vars": credentials}
    return options


def app(args: dict[str, str]) -> serve.Application:
    """`serve run autoprune.serve:app model=NAME max_latency_ms=MS [tracking_uri=URI] [device=cuda]
    [batch_size=N] [dtype=D] [runtime=R] [measured_on=DEVICE]`."""
    from autoprune.tracking.select import best

    batch_size = int(args["batch_size"]) if "batch_size" in args else None
    given = (("device", args.get("measured_on")), ("batch_size", batch_size), ("dtype", args.get("dtype")),
             ("runtime", args.get("runtime")))
    conditions = {key: value for key, value in given if value is not None}
    choice = best(model=args["model"], max_latency_ms=float(args["max_latency_ms"]),
                  tracking_uri=args.get("tracking_uri"), **conditions)
    import ray

    cluster = ray.cluster_resources() if ray.is_initialized() else None  # `serve run` connects before it builds
    options = replica_options(choice, device=args.get("device"), cluster=cluster)
    return PrunedModel.options(ray_actor_options=options).bind(
        args["model"], float(args["max_latency_ms"]), args.get("tracking_uri"), args.get("device"), conditions)
