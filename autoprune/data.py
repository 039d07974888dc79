"""Image data for a search: the built-in reference task, ImageFolder trees and torchvision datasets already on disk,
held as uint8 tensors.

The driver builds one :class:`DataBundle` per search and puts it into Ray's object store once, so trials need no
dataset access. At ImageNet scale the images are gigabytes, so:
- they travel as numpy arrays, which every worker on a node reads from the object store without a copy (torch
  tensors would be copied into each worker) and uses as tensors over the same memory;
- they stay uint8 (a quarter of float32) until a batch is on the device that uses it, where it is normalised
  (`Batches`): a calibration set is never expanded to float32 whole;
- an ImageFolder is decoded on every core, and the decoded subsets are cached for the next search or `--resume`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from autoprune.errors import AutopruneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The reference task: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), upscaled to RGB.
REFERENCE_IMAGE_SIZE = 32
REFERENCE_NUM_CLASSES = 10
REFERENCE_EVAL_FRACTION = 0.3


@dataclass(frozen=True, init=False, eq=False)
class ImageSet:
    """Images (uint8, N×C×H×W) and their integer labels (N).

    A subset is a view: it keeps the rows it picked of the images it was drawn from and gathers a batch only when
    one is asked for (`take`), so that a trial's calibration images are not a second copy of the data (at ImageNet
    scale, 4,096 images are 600 MB). `images` gives the images as one tensor (a copy, for a subset)."""

    source: torch.Tensor  # uint8, the images this set is drawn from (shared, never written)
    labels: torch.Tensor  # int64, this set's labels, one per image
    rows: torch.Tensor | None  # which rows of `source` this set holds, in order (None: all of them)

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        object.__setattr__(self, "source", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "rows", rows)

    @property
    def images(self) -> torch.Tensor:
        return self.source if self.rows is None else self.source[self.rows]

    def take(self, which: torch.Tensor | slice) -> torch.Tensor:
        """The uint8 images at positions `which` of this set (indices or a slice), gathered from the source."""
        if self.rows is None:
            return self.source[which]
        return self.source[self.rows[which]]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __reduce__(self):
        # Ray's object store gives numpy arrays to every worker on a node without a copy, torch tensors with one:
        # an ImageSet travels as numpy and is rebuilt as tensors over the same (read-only) memory.
        rows = None if self.rows is None else self.rows.numpy()
        return (_image_set, (self.source.numpy(), self.labels.numpy(), rows))

    def compact(self) -> "ImageSet":
        """This set with only its own images (a copy of its rows): what to send to another process, where a view
        would carry the whole set it was drawn from (a training pool of gigabytes for a few hundred images)."""
        return self if self.rows is None else ImageSet(self.images, self.labels)

    def subset(self, count: int, *, seed: int) -> "ImageSet":
        """A class-balanced random subset of `count` images (all of them if count ≥ len), as a view."""
        if count >= len(self):
            return self
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=generator)
        # Round-robin over classes so that a small calibration budget still sees every class.
        labels = self.labels.tolist()
        by_class: dict[int, list[int]] = {}
        for index in order.tolist():
            by_class.setdefault(labels[index], []).append(index)
        picked: list[int] = []
        queues = list(by_class.values())
        while len(picked) < count:
            for queue in queues:
                if queue and len(picked) < count:
                    picked.append(queue.pop())
        chosen = torch.tensor(sorted(picked), dtype=torch.long)
        return ImageSet(self.source, self.labels[chosen], chosen if self.rows is None else self.rows[chosen])


def _image_set(images: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> ImageSet:
    with warnings.catch_warnings():  # arrays read from the object store are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        return ImageSet(torch.from_numpy(images), torch.from_numpy(labels),
                        None if rows is None else torch.from_numpy(rows))


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images → float32 on their own device, scaled to [0, 1] and standardised with `mean` and `std`."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class Batches:
    """uint8 images served as normalised float32 batches on `device`, one batch at a time (what a pruning method's
    statistics pass reads): at ImageNet size, 4,096 calibration images would be 2.4 GB as one float32 tensor.
    `split(n)` mirrors `Tensor.split`, so a method can be given either."""

    images: ImageSet  # uint8, where the data lives (the CPU, shared)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.images)

    def split(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), batch_size):
            yield normalize(self.images.take(slice(start, start + batch_size)).to(self.device), self.mean, self.std)


@dataclass(frozen=True)
class DataBundle:
    """What every trial of a search needs from the data: a training pool and a held-out eval split."""

    train: ImageSet  # healing draws its calibration images from here
    eval: ImageSet  # held out: healing never sees it; accuracy is measured here
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.eval.source.shape[1:])  # type: ignore[return-value]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images → float32 on their own device, scaled to [0, 1] and standardised with the bundle's mean and
        std. Move a batch to its device first: the uint8 copy is a quarter of the float32 one."""
        return normalize(images, self.mean, self.std)

    def batches(self, images: ImageSet, device: torch.device | str = "cpu") -> Batches:
        """`images` as normalised batches on `device`, made one at a time."""
        return Batches(images, self.mean, self.std, torch.device(device))


def reference_task(*, seed: int = 0) -> DataBundle:
    """The built-in task: scikit-learn's digits, upscaled to 32×32 RGB, split 70/30 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # N×1×8×8 in [0, 1]
    upscaled = F.interpolate(pixels, size=REFERENCE_IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = (upscaled.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, eval_idx = train_test_split(
        np.arange(len(labels)), test_size=REFERENCE_EVAL_FRACTION, stratify=labels.numpy(), random_state=seed
    )
    train = ImageSet(images[train_idx], labels[train_idx])
    mean = float(train.images.float().mean() / 255.0)
    std = float(train.images.float().std() / 255.0)
    return DataBundle(
        train=train,
        eval=ImageSet(images[eval_idx], labels[eval_idx]),
        num_classes=REFERENCE_NUM_CLASSES,
        mean=(mean,) * 3,
        std=(std,) * 3,
    )


def image_folder(
    *,
    train_dir: str | Path,
    val_dir: str | Path,
    image_size: int,
    train_images: int,
    eval_images: int | None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    echo=None,
) -> DataBundle:
    """An ImageFolder train/val pair (one sub-folder per class), resized and centre-cropped to `image_size`.

    Only `train_images` training images (the largest calibration budget the search can ask for) and at most
    `eval_images` validation images are read, each a class-balanced random subset, decoded on `workers` threads
    (default: every core). With `cache_dir`, the decoded subsets are kept there, keyed by the files chosen (path,
    size, modification time) and the settings, so that the next search or a `--resume` starts without decoding.
    `echo` hears what is decoded or read, and how long it took (decoding ImageNet subsets takes minutes).
    """
    from torchvision import datasets

    splits = []
    for role, folder, count in (("train", train_dir, train_images), ("val", val_dir, eval_images)):
        folder = Path(folder)
        if not folder.is_dir():
            raise AutopruneError(f"data.{role}_dir: {str(folder)!r} is not a directory; give an ImageFolder tree.")
        try:
            dataset = datasets.ImageFolder(str(folder))
        except (FileNotFoundError, RuntimeError) as error:  # torchvision's "Found no valid file for the classes"
            raise AutopruneError(
                f"data.{role}_dir: {str(folder)!r} holds no images in class sub-folders ({error})."
            ) from None
        labels = torch.tensor(dataset.targets)
        index = ImageSet(torch.arange(len(labels)), labels).subset(count or len(labels), seed=seed)
        files = [dataset.samples[i][0] for i in index.images.tolist()]
        images = _decoded(files, image_size, cache_dir, workers, echo or (lambda line: None), role)
        splits.append((ImageSet(images, index.labels), dataset.classes))
    (train, train_classes), (evaluation, val_classes) = splits
    if train_classes != val_classes:
        raise AutopruneError(
            f"data: the train and val folders have different classes ({len(train_classes)} vs {len(val_classes)});"
            " both must hold the same class sub-folders."
        )
    return DataBundle(train=train, eval=evaluation, num_classes=len(train_classes), mean=mean, std=std)


def torchvision_dataset(
    *,
    name: str,
    root: str | Path,
    image_size: int,
    train_images: int,
    eval_images: int | None,
    seed: int = 0,
    staging_dir: str | Path | None = None,
) -> DataBundle:
    """A torchvision dataset already on disk (FashionMNIST, MNIST, KMNIST, CIFAR10, CIFAR100, SVHN, …), read by its
    own torchvision class and never downloaded: its train split for calibration, its test split for accuracy.

    Class-balanced random subsets of `train_images` and at most `eval_images` images are kept, made RGB (grey
    images repeated) and resized to `image_size` (antialiased: these are small squares), normalised by the train
    subset's per-channel mean and std. MNIST-family files lying flat in `root` (as Debian's
    `dataset-fashion-mnist` ships them, gzipped, in /usr/share/datasets/fashion-mnist) are first laid out the way
    torchvision reads them, in `staging_dir`.
    """
    from torchvision import datasets

    kind = getattr(datasets, name, None)
    if not isinstance(kind, type) or not issubclass(kind, datasets.VisionDataset):
        known = sorted(n for n in dir(datasets) if isinstance(getattr(datasets, n), type) and n[0].isupper())
        raise AutopruneError(f"data.dataset: {name!r} is not a torchvision dataset; e.g. {', '.join(known[:12])}.")
    root = Path(root)
    if issubclass(kind, datasets.MNIST):
        root = _mnist_layout(kind, root, staging_dir)
    splits = []
    for role, train, count in (("train", True, train_images), ("eval", False, eval_images)):
        try:
            dataset = kind(str(root), download=False, **_split_argument(kind, train))
        except RuntimeError as error:  # torchvision: "Dataset not found. You can use download=True to download it"
            raise AutopruneError(
                f"data.root: {str(root)!r} does not hold torchvision's {name} ({error}); autoprune never downloads"
                " data: put the dataset's files there (for FashionMNIST: `apt-get install dataset-fashion-mnist`"
                " and root: /usr/share/datasets/fashion-mnist)."
            ) from None
        labels = torch.as_tensor(np.asarray(getattr(dataset, "targets", getattr(dataset, "labels", None))))
        index = ImageSet(torch.arange(len(labels)), labels).subset(count or len(labels), seed=seed)
        images = _rgb_resized(_raw_images(dataset, index.images.numpy()), image_size)
        splits.append((ImageSet(images, index.labels), len(getattr(dataset, "classes", ())) or int(labels.max()) + 1))
    (train, classes), (evaluation, _) = splits
    pixels = train.images.float().div(255).transpose(0, 1).reshape(3, -1)
    return DataBundle(train=train, eval=evaluation, num_classes=classes,
                      mean=tuple(pixels.mean(1).tolist()), std=tuple(pixels.std(1).clamp_min(1e-3).tolist()))


def _split_argument(kind: type, train: bool) -> dict:
    import inspect

    parameters = inspect.signature(kind.__init__).parameters
    if "train" in parameters:
        return {"train": train}
    if "split" in parameters:
        return {"split": "train" if train else "test"}
    raise AutopruneError(f"data.dataset: {kind.__name__} has neither a train flag nor a train/test split.")


def _mnist_layout(kind: type, root: Path, staging_dir: str | Path | None) -> Path:
    """`root` as torchvision's MNIST classes read it (root/NAME/raw/the idx files, uncompressed); files that lie
    flat in `root`, gzipped or not, are copied there once, decompressed."""
    import gzip
    import shutil
    import tempfile

    wanted = [Path(url).name.removesuffix(".gz") for url, _ in kind.resources]
    if all((root / kind.__name__ / "raw" / file).is_file() for file in wanted):
        return root
    flat = {file: next((root / f"{file}{suffix}" for suffix in ("", ".gz") if (root / f"{file}{suffix}").is_file()),
                       None) for file in wanted}
    if any(path is None for path in flat.values()):
        return root  # neither layout: torchvision's own error says what is missing
    staged = Path(staging_dir or tempfile.mkdtemp(prefix="autoprune-data-")) / "torchvision"
    raw = staged / kind.__name__ / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for file, source in flat.items():
        if not (raw / file).is_file():
            partial = raw / f"{file}.{os.getpid()}.partial"
            opener = gzip.open if source.suffix == ".gz" else open
            with opener(source, "rb") as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out)
            partial.replace(raw / file)
    return staged


def _raw_images(dataset, rows: np.ndarray) -> torch.Tensor:
    """The chosen images as uint8, N×H×W or N×H×W×C (from the dataset's array where it has one, else one by one)."""
    data = getattr(dataset, "data", None)
    if data is not None and len(data) == len(dataset):
        return torch.as_tensor(np.asarray(data)[rows])
    return torch.stack([torch.as_tensor(np.asarray(dataset[int(row)][0])) for row in rows])


def _rgb_resized(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    if images.dim() == 3:  # grey: N×H×W
        images = images.unsqueeze(1)
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # N×H×W×C (CIFAR) rather than N×C×H×W (SVHN)
        images = images.movedim(-1, 1)
    images = images.expand(-1, 3, -1, -1)  # grey channels repeated (a view)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk].float()
        if batch.shape[-1] != size or batch.shape[-2] != size:
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = batch.round().clamp(0, 255).to(torch.uint8)
    return out


DECODE_RECIPE = 1  # bump when the resize / crop below changes, so that stale cached decodes are not reused


def _decoded(files: list[str], image_size: int, cache_dir: str | Path | None, workers: int | None, echo,
             role: str) -> torch.Tensor:
    """The files decoded, resized to image_size / 0.875 and centre-cropped (uint8, N×3×S×S), from the cache when
    the same files were decoded the same way before (memory-mapped: the pages are the file's, not the process's)."""
    path = None
    if cache_dir is not None:
        stats = [(name, os.stat(name).st_size, os.stat(name).st_mtime_ns) for name in files]
        key = json.dumps({"files": stats, "size": image_size, "recipe": DECODE_RECIPE}, sort_keys=True)
        path = Path(cache_dir) / f"images-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
        if path.is_file():
            echo(f"{role}: {len(files)} decoded images from the cache {path}")
            with warnings.catch_warnings():  # read-only pages: nothing writes to the images
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.load(path, mmap_mode="r"))
    from torchvision import transforms
    from torchvision.datasets.folder import default_loader

    transform = transforms.Compose([transforms.Resize(int(round(image_size / 0.875))),
                                    transforms.CenterCrop(image_size), transforms.PILToTensor()])
    images = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)  # filled in place: one copy

    def decode(index: int) -> None:
        images[index] = transform(default_loader(files[index]))

    threads = workers or os.cpu_count() or 1
    started = time.perf_counter()
    echo(f"{role}: decoding {len(files)} images on {threads} threads")
    # PIL releases the GIL while it decodes and resizes: threads use every core.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(decode, range(len(files))):
            pass
    cached = ""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial.npy")
        np.save(partial, images.numpy())
        partial.replace(path)  # complete or absent: a reader never sees half a file
        cached = f", cached at {path}"
    echo(f"{role}: decoded {len(files)} images in {time.perf_counter() - started:.1f} s{cached}")
    return images
