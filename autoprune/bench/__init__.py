"""The measured tables the README quotes (`autoprune bench …`): pruning and healing methods, latency, data,
serving, a cluster, faults, model families and the search's sample efficiency."""

from __future__ import annotations

from pathlib import Path


def demo_spec() -> dict:
    """The embedded demo's spec as plain data (what YAML gives), for a benchmark to change."""
    from autoprune.space.load import demo_document

    return demo_document()


# Real Fashion-MNIST as Debian's `dataset-fashion-mnist` ships it (read through torchvision, never downloaded).
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_HOWTO = ("on Debian/Ubuntu: `sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` (it puts"
                 f" the files in {FASHION_ROOT})")


def fashion_mnist_data(**overrides) -> dict:
    """`data:` of a spec that reads Fashion-MNIST at 32×32 (the demo ViT's input), 2,000 test images."""
    return {"source": "torchvision", "dataset": "FashionMNIST", "root": FASHION_ROOT, "image_size": 32,
            "eval_images": 2000, **overrides}


def fashion_mnist_present() -> bool:
    return (Path(FASHION_ROOT) / "train-images-idx3-ubyte.gz").is_file() or (
        Path(FASHION_ROOT) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
