"""`autoprune bench data`: memory and start-up of a search whose data is ImageNet-sized.

The shipped DeiT-S and ResNet-50 specs hold gigabytes of uint8 images. This benchmark writes an ImageFolder of
random JPEGs (by default 10,000 training images, decoded at 224×224: 1.5 GB of uint8), and runs a real search on it
as a fresh `autoprune search` process: 4 trials at once of a small ResNet, each with a calibration budget of 4,096
or all 10,000 images (structured removal, a few fine-tuning steps), on a local Ray. While it runs, it samples every
process of the search once a second and reports:

- the driver's peak RSS, and each trial worker's peak RSS split the way the kernel counts it (/proc/PID/status):
  RssAnon, the process's own heap (a copy of the data would land here), and RssShmem, the pages of Ray's object
  store (shared memory) that it has read — the one copy every worker on the node shares;
- the time from start to the first trial (the first Tune trial actor), and the time spent decoding the images;
- the same search started again in the same work directory, where the decoded images come from the cache.

Target (issue 11): each worker's peak memory below 1.5× the data, and no copy of the data per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from autoprune.argtypes import positive_int
from autoprune.bench import record

CLASSES = 10


def write_image_folder(root: Path, *, train: int, val: int, size: int = 256, seed: int = 0) -> Path:
    """`train` + `val` random RGB JPEGs in CLASSES class folders (skipped if already there)."""
    import numpy as np
    from PIL import Image

    marker = root / f".complete-{train}-{val}-{size}"
    if marker.is_file():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for index in range(count):
            folder = root / split / f"class{index % CLASSES:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            # smooth noise compresses like a photo, not like static (a more realistic decode cost)
            small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{index:06d}.jpg", quality=90)
    marker.write_text("")
    return root


def spec(folder: Path, *, images: int, trials: int, image_size: int) -> dict:
    return {
        "name": "bench-data",
        "model": {"name": "resnet18", "num_classes": CLASSES, "train_steps": 5,
                  "kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}},
        "data": {"source": "imagefolder", "train_dir": str(folder / "train"), "val_dir": str(folder / "val"),
                 "image_size": image_size, "eval_images": 256},
        "profile": {"batch_size": 8, "warmup": 2, "repeats": 5, "memory_format": "contiguous"},
        "search": {"trials": trials, "concurrency": trials, "sampler": "random", "seed": 0,
                   "resources": {"cpu": 0.5}},
        "mlflow": {"experiment": "bench-data", "registered_model": "bench-data-model"},
        "space": {"prune": {"methods": ["structured"], "sparsity": {"low": 0.5, "high": 0.7}},
                  "heal": {"methods": ["finetune"], "calibration_images": [min(4096, images), images], "steps": 3,
                           "lr": 1e-3, "batch_size": 16, "budget": "searched"}},  # both image counts: the data
    }


class _Sampler:
    """Samples the memory of a process tree once a second: the driver, and every Ray trial worker."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid, self.started = root_pid, time.monotonic()
        self.driver: dict[str, float] = {}
        self.workers: dict[int, dict[str, float]] = {}
        self.first_trial_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            _peak(self.driver, self.root_pid)
            for process in psutil.process_iter(["pid", "cmdline"]):
                title = " ".join(process.info["cmdline"] or [])
                if "ImplicitFunc" not in title:  # Tune's function-trial actors (Ray sets the process title)
                    continue
                if self.first_trial_s is None:
                    self.first_trial_s = time.monotonic() - self.started
                _peak(self.workers.setdefault(process.info["pid"], {}), process.info["pid"])
            self._stop.wait(1.0)


def _peak(peaks: dict[str, float], pid: int) -> None:
    """Raise `peaks` to the process's current VmRSS / RssAnon / RssShmem (MB), as /proc/PID/status counts them."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssShmem"):
                    peaks[key] = max(peaks.get(key, 0.0), int(value.split()[0]) / 1024)
    except OSError:  # the process ended between the listing and the read
        pass


def _search(spec_path: Path, workdir: Path, echo) -> dict:
    """One `autoprune search` in a fresh process, sampled; its timeline from its own output."""
    command = [sys.executable, "-m", "autoprune.cli", "search", str(spec_path), "--workdir", str(workdir)]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"})
    marks: dict[str, float] = {}
    lines = []
    with _Sampler(process.pid) as sampler:
        for line in process.stdout:
            lines.append(line)
            now = time.monotonic() - started
            if "loading data" in line:
                marks.setdefault("loading", now)
            elif "data.train: decoding" in line or "data.train:" in line and "from the cache" in line:
                marks.setdefault("train_images", now)
            elif "data.train: decoded" in line or "data.val:" in line:
                marks.setdefault("train_images_done", now)
            elif "measuring the dense model" in line:
                marks.setdefault("loaded", now)
        process.wait()
    if process.returncode not in (0, 1):  # 1: finished with an empty front, which says nothing about memory
        raise RuntimeError("the search failed:\n" + "".join(lines[-40:]))
    workers = sampler.workers.values()
    return {
        "wall_s": time.monotonic() - started,
        "data_and_dense_s": marks.get("loaded", float("nan")) - marks.get("loading", float("nan")),
        "train_images_s": marks.get("train_images_done", float("nan")) - marks.get("train_images", float("nan")),
        "first_trial_s": sampler.first_trial_s,
        "driver_peak_rss_mb": sampler.driver.get("VmRSS", 0.0),
        "worker_peak_rss_mb": max((w.get("VmRSS", 0.0) for w in workers), default=0.0),
        "worker_peak_anon_mb": max((w.get("RssAnon", 0.0) for w in workers), default=0.0),
        "worker_peak_shmem_mb": max((w.get("RssShmem", 0.0) for w in workers), default=0.0),
        "workers": len(workers),
        "failed": next((line.strip() for line in lines if "FAILED" in line), ""),
    }


def run(root: Path, *, images: int, trials: int, image_size: int, echo=print) -> dict:
    folder = write_image_folder(root / "imagefolder", train=images, val=256)
    data_mb = images * 3 * image_size * image_size / 2**20
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec(folder, images=images, trials=trials, image_size=image_size)))
    workdir = root / "work"
    echo(f"bench data: {images} images at {image_size}×{image_size} = {data_mb:.0f} MB of uint8; {trials} trials at once")
    first = _search(spec_path, workdir, echo)
    echo(f"  first search: {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in first.items()})}")
    again = _search(spec_path, workdir, echo)  # the decoded images are cached in the work directory now
    echo(f"  again: {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in again.items()})}")
    return {"images": images, "image_size": image_size, "data_mb": data_mb, "trials_at_once": trials,
            "first": first, "cached": again}


def markdown(result: dict) -> str:
    data = result["data_mb"]
    lines = [f"{result['images']:,} images at {result['image_size']}×{result['image_size']} ({data:,.0f} MB of uint8),"
             f" {result['trials_at_once']} trials at once:", "",
             "| run | training images decoded / read s | data + dense model s | first trial starts s | wall s |"
             " driver peak RSS MB | worker peak RSS MB (÷ data) | of which its own heap (RssAnon) MB |"
             " of which object-store pages (RssShmem) MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, key in (("first search (decodes)", "first"), ("again (decoded images cached)", "cached")):
        r = result[key]
        lines.append(f"| {name} | {r.get('train_images_s', float('nan')):.1f} | {r['data_and_dense_s']:.1f} |"
                     f" {r['first_trial_s'] or float('nan'):.1f} |"
                     f" {r['wall_s']:.0f} | {r['driver_peak_rss_mb']:,.0f} | {r['worker_peak_rss_mb']:,.0f}"
                     f" ({r['worker_peak_rss_mb'] / data:.2f}×) | {r['worker_peak_anon_mb']:,.0f} |"
                     f" {r['worker_peak_shmem_mb']:,.0f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=positive_int, default=10_000, help="training images (default 10000)")
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--trials", type=positive_int, default=4, help="trials at once (default 4)")
    parser.add_argument("--workdir", help="where the images and the searches go (default: a temporary folder)")
    parser.add_argument("--json", dest="json_path", help="also write the measurements as JSON here")


def main_data(args) -> int:
    provenance = record.Provenance("data")
    with tempfile.TemporaryDirectory(prefix="autoprune-bench-data-") as scratch:
        result = run(Path(args.workdir or scratch).resolve(), images=args.images, trials=args.trials,
                     image_size=args.image_size)
    if args.json_path:
        record.write(args.json_path, provenance, result)
    print()
    print(markdown(result))
    return 0
