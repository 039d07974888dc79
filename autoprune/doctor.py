"""`autoprune doctor`: check, end to end, the machine and cluster a search will run on. Run it first on any GPU box.

Two parts, one table. The environment: torch, CUDA and cuDNN versions; each visible GPU's name, compute
capability and memory; bf16; whether 2:4 sparse kernels run here, and what a 2:4 Linear of a ViT-S MLP shape
measures against its dense twin; NCCL; Ray's resources and accelerator types (a local Ray, or `--address`); the
tracking URI reachable and the storage writable. Then the paths a trial takes, each a tiny real trial on a Ray
worker with the device Ray assigned it — a ViT and a ResNet, each with structured removal + distillation,
progressive pruning + fine-tuning and 2:4 (N:M) pruning, the profile in bf16 where the device has it, the saved
model reloaded in its recipe — and DeepSpeed healing on 2 workers when 2 GPUs are visible.

Each row is ok, warning, failed or skipped (with the reason). The exit status is 1 if any row failed.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

OK, WARNING, FAILED, SKIPPED = "ok", "warning", "FAILED", "skipped"


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    area: str
    name: str
    status: str
    detail: str


def diagnose(*, address: str | None = None, tracking_uri: str | None = None, storage: str | None = None,
             workdir: str | Path = ".", echo: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check, in order; `echo` sees each row as it is done (the trials take a few seconds each)."""
    rows: list[Check] = []

    def add(area: str, name: str, status: str, detail: str) -> None:
        rows.append(Check(area, name, status, detail))
        if echo:
            echo(rows[-1])

    checks = [("environment", "software", _software), ("gpu", "GPUs", _gpus), ("gpu", "bfloat16", _bf16),
              ("gpu", "2:4 sparse kernels", _two_four), ("gpu", "NCCL", _nccl),
              ("ray", "cluster", lambda add: _ray(add, address)),
              ("mlflow", "tracking", lambda add: _tracking(add, tracking_uri, Path(workdir))),
              ("storage", "trial checkpoints", lambda add: _storage(add, storage, Path(workdir))),
              ("trial", "trials", _trials)]
    for area, name, check in checks:
        try:
            check(add)
        except Exception as error:  # noqa: BLE001 — a check that raises is a failed row; the rest still run
            add(area, name, FAILED, f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
    return rows


# ---- the environment ----------------------------------------------------------------------------------------


def _software(add) -> None:
    from importlib import metadata

    import torch

    add("environment", "python", OK, platform.python_version())
    cuda = torch.version.cuda
    add("environment", "torch", OK, f"{torch.__version__} (built with CUDA {cuda or 'none'})")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    add("environment", "cuDNN", OK if cudnn or not torch.cuda.is_available() else WARNING,
        _cudnn_version(cudnn) if cudnn else "not available" + ("" if torch.cuda.is_available() else " (no GPU)"))
    for package in ("timm", "torch-pruning", "ray", "optuna", "mlflow", "deepspeed"):
        try:
            add("environment", package, OK, metadata.version(package))
        except metadata.PackageNotFoundError:
            needed = package != "deepspeed"
            add("environment", package, FAILED if needed else WARNING,
                "not installed" + ("" if needed else " (only `heal_runtime.engine: deepspeed` needs it)"))


def _cudnn_version(number: int) -> str:
    """cuDNN's integer version as major.minor.patch (its encoding changed at 9: 90100 is 9.1.0, 8902 is 8.9.2)."""
    if number >= 90000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def _gpus(add) -> None:
    import torch

    if not torch.cuda.is_available():
        add("gpu", "visible GPUs", SKIPPED, "no GPU: trials run and are timed on the CPU")
        return
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        add("gpu", f"cuda:{index}", OK, f"{props.name}, compute capability {props.major}.{props.minor},"
                                        f" {props.total_memory / 2**30:.0f} GiB")


def _bf16(add) -> None:
    import torch

    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        add("gpu", "bfloat16", OK if supported else WARNING,
            "supported" if supported else "not supported on this GPU: profile in float16 or float32")
        return
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    add("gpu", "bfloat16", OK if torch.isfinite(x @ x).all() else FAILED, "runs on the CPU (no GPU)")


def _two_four(add) -> None:
    import torch

    from autoprune.measure.formats import semi_structured_backend, semi_structured_unsupported

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = semi_structured_unsupported(device, torch.bfloat16)
    if reason:
        add("gpu", "2:4 sparse kernels", SKIPPED, reason.rsplit(": timed", 1)[0])
        return
    dense_ms, sparse_ms = two_four_microbenchmark()
    backend = semi_structured_backend().__name__.removeprefix("SparseSemiStructuredTensor")
    add("gpu", "2:4 sparse kernels", OK if sparse_ms < dense_ms else WARNING,
        f"{backend}: Linear 384→1536 on 64×197 tokens, bf16: dense {dense_ms:.3f} ms, 2:4 {sparse_ms:.3f} ms"
        f" ({dense_ms / sparse_ms:.2f}×)" + ("" if sparse_ms < dense_ms else ": slower than dense at this shape"))


def two_four_microbenchmark(tokens: int = 64 * 197, width: int = 384, hidden: int = 1536) -> tuple[float, float]:
    """Milliseconds of a ViT-S MLP's first Linear (width → hidden) on `tokens` rows, dense and on 2:4 kernels."""
    import statistics

    import torch
    from torch import nn

    from autoprune.measure.formats import to_semi_structured
    from autoprune.measure.timing import time_model
    from autoprune.prune.nm import nm_mask

    layer = nn.Linear(width, hidden).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    inputs = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    dense = statistics.median(time_model(layer, inputs, warmup=10, repeats=50))
    to_semi_structured(layer, torch.bfloat16)
    sparse = statistics.median(time_model(layer, inputs, warmup=10, repeats=50))
    return dense, sparse


def _nccl(add) -> None:
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        add("gpu", "NCCL", SKIPPED, "no GPU (DeepSpeed healing on CPUs uses gloo)")
        return
    if not dist.is_nccl_available():
        add("gpu", "NCCL", FAILED, "this torch has no NCCL: DeepSpeed healing on GPUs cannot run")
        return
    version = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    add("gpu", "NCCL", OK, f"version {version}")


def _ray(add, address: str | None) -> None:
    from autoprune.driver.connect import start_ray

    ray = start_ray(address)
    resources = ray.cluster_resources()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    add("ray", "cluster", OK, f"{address or 'local'}: {len(nodes)} node(s), {resources.get('CPU', 0):g} CPU,"
                              f" {resources.get('GPU', 0):g} GPU")
    types = sorted(key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:"))
    add("ray", "accelerator types", OK if types or not resources.get("GPU") else WARNING,
        ", ".join(types) if types else "none declared" + (" (no GPU)" if not resources.get("GPU") else
                                                          ": profile.target cannot name a GPU type"))


def _tracking(add, tracking_uri: str | None, workdir: Path) -> None:
    from autoprune.tracking.store import Tracker, is_tracking_server, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, None, workdir)
    started = time.perf_counter()
    if is_tracking_server(uri):  # a quick answer first: MLflow's client retries an absent server for minutes
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
        except OSError as error:
            add("mlflow", "tracking", FAILED, f"{uri} does not answer ({error}); start the server or fix --tracking-uri")
            return
    tracker = Tracker(uri, "autoprune-doctor")  # raises with the reason when it is not usable
    run = tracker.client.create_run(tracker.experiment_id, run_name="doctor")
    tracker.client.set_terminated(run.info.run_id)
    kind = "tracking server" if is_tracking_server(uri) else "local store"
    add("mlflow", "tracking", OK, f"{kind} {uri}: wrote a run in {time.perf_counter() - started:.1f} s")


def _storage(add, storage: str | None, workdir: Path) -> None:
    import pyarrow.fs

    target = storage or str((workdir / "ray").resolve())
    filesystem, path = pyarrow.fs.FileSystem.from_uri(target if "://" in target else Path(target).resolve().as_uri())
    probe = f"{path.rstrip('/')}/.autoprune-doctor-{time.time_ns()}"
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(probe) as stream:
        stream.write(b"ok")
    filesystem.delete_file(probe)
    add("storage", "trial checkpoints", OK, f"{target} is writable" + ("" if storage else " (the default: one"
                                                                        " machine only; give --storage on a cluster)"))


# ---- the paths a trial takes ----------------------------------------------------------------------------------

PATHS = (  # (name, prune method, prune options, heal method)
    ("structured + distill", "structured", {}, "distill"),
    ("progressive + finetune", "progressive", {}, "finetune"),
    ("nm 2:4 + finetune", "nm", {"n": 2, "m": 4}, "finetune"),
)


def _models():
    from autoprune.models import ModelSource

    return {
        "vit": ModelSource("vit_tiny_patch16_224", 10, {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                                                        "num_heads": 2, "global_pool": "avg", "class_token": False}),
        "resnet": ModelSource("resnet18", 10, {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}),
    }


def _trials(add) -> None:
    import ray
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_gpu = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and gpus else 0
    dtype = "bfloat16" if not use_gpu or torch.cuda.is_bf16_supported() else "float16"
    task = ray.remote(num_cpus=1, num_gpus=use_gpu)(_trial_on_worker)
    for model, source in _models().items():
        for name, method, options, healing in PATHS:
            row = ray.get(task.remote(source, method, options, healing, dtype))
            add("trial", f"{model}: {name}", *row)
    if gpus >= 2:
        row = ray.get(ray.remote(num_cpus=1, num_gpus=0)(_deepspeed_on_worker).remote(_models()["vit"]))
        add("trial", "vit: DeepSpeed healing, 2 GPU workers", *row)
    else:
        add("trial", "DeepSpeed healing on GPUs", SKIPPED, f"needs 2 visible GPUs, this machine has {gpus}")


def _context(source, dtype: str, engine=None):
    import torch

    from autoprune.config import ProfileSpec
    from autoprune.data import reference_task
    from autoprune.trial import TrialContext

    torch.manual_seed(0)
    return TrialContext(source, source.create().state_dict(), reference_task(seed=0),
                        ProfileSpec(batch_size=8, warmup=2, repeats=5, dtype=dtype), healing_engine=engine)


def _trial_on_worker(source, method: str, options: dict, healing: str, dtype: str) -> tuple[str, str]:
    """One tiny trial, as a search's worker runs it (the device Ray assigned), then its saved model reloaded in its
    recipe and compared with the trial's own outputs: (status, detail)."""
    import torch

    from autoprune.config import HealConfig, PruneConfig, TrialConfig
    from autoprune.measure.latency import assigned_device
    from autoprune.saved import load_model_dir
    from autoprune.trial import run_trial

    device = assigned_device()
    context = _context(source, dtype)
    config = TrialConfig(PruneConfig(method, {} if method == "nm" else {"all": 0.5}, options),
                         HealConfig(healing, calibration_images=64, steps=4, lr=1e-3, batch_size=16))
    try:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            result = run_trial(config, context, save_dir=folder, device=device, threads=1)
            seconds = time.perf_counter() - started
            served = load_model_dir(folder)  # in its recipe, on the kind of device it was timed on
            plain = load_model_dir(folder, recipe=False)
            images = context.data.normalize(context.data.eval.take(slice(0, 8)))
            with torch.no_grad():
                gap = (served(images).float().cpu() - plain(images)).abs().max().item()
    except Exception:  # noqa: BLE001 — the failure is the row
        return FAILED, traceback.format_exc(limit=-3).strip().splitlines()[-1][:300]
    latency = result.latency
    tolerance = 1e-4 if latency.dtype == "float32" else 0.1
    status = OK if gap <= tolerance * max(1.0, plain(images).abs().max().item()) else FAILED
    note = f"; {latency.note}" if latency.note else ""
    return status, (f"{seconds:.1f} s on {device.type}: sparsity {result.sparsity:.2f}, {latency.median_ms:.3f} ms"
                    f" ({latency.dtype}, {latency.memory_format}, {latency.format} kernels){note}; reloaded in its"
                    f" recipe, max |Δ| {gap:.2g}")


def _deepspeed_on_worker(source) -> tuple[str, str]:
    from autoprune.config import HealConfig, HealingEngine, PruneConfig, TrialConfig
    from autoprune.measure.latency import assigned_device
    from autoprune.trial import run_trial

    engine = HealingEngine("deepspeed", workers=2, zero_stage=2, bf16=True, cpu=1, gpu=1)
    config = TrialConfig(PruneConfig("magnitude", {"all": 0.5}),
                         HealConfig("distill", calibration_images=64, steps=4, lr=1e-3, batch_size=16))
    try:
        started = time.perf_counter()
        result = run_trial(config, _context(source, "bfloat16", engine), device=assigned_device(), threads=1)
    except Exception:  # noqa: BLE001
        return FAILED, traceback.format_exc(limit=-3).strip().splitlines()[-1][:300]
    return OK, f"{time.perf_counter() - started:.1f} s: ZeRO-2 bf16 over NCCL, sparsity {result.sparsity:.2f}"


# ---- output -------------------------------------------------------------------------------------------------


def text(rows: list[Check]) -> str:
    widths = [max(len(getattr(row, field)) for row in rows) for field in ("area", "name", "status")]
    lines = []
    for row in rows:
        lines.append(f"{row.area:<{widths[0]}}  {row.name:<{widths[1]}}  {row.status:<{widths[2]}}  {row.detail}")
    failed = sum(row.status == FAILED for row in rows)
    warned = sum(row.status == WARNING for row in rows)
    lines.append("")
    lines.append(f"{len(rows)} checks: {failed} failed, {warned} warnings." + (
        " Fix the failed rows before a search." if failed else " This machine can run a search."))
    return "\n".join(lines)


def main_doctor(args) -> int:
    if getattr(args, "acceptance", False):
        from autoprune.acceptance import main_acceptance

        return main_acceptance(args)

    def live(row: Check) -> None:
        if not args.json:
            print(f"  {row.status:<8} {row.area}: {row.name}", flush=True)

    rows = diagnose(address=args.address, tracking_uri=args.tracking_uri, storage=args.storage,
                    workdir=args.workdir, echo=live)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=1))
    else:
        print()
        print(text(rows))
    return 1 if any(row.status == FAILED for row in rows) else 0
