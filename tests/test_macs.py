"""MACs: `count_macs` prices every op with torch's own FLOP formulas, as `FlopCounterMode` does, without its module
tracker — so it gives FlopCounterMode's numbers wherever FlopCounterMode works, and counts models it cannot (PiT)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from autoprune.measure.metrics import _FlopCounter, count_macs

# (timm name, create kwargs, image size): tiny real models of the families a search meets — BatchNorm CNNs,
# depthwise/squeeze-excite CNNs, ViTs with fused attention, windowed attention, LeViT's conv/attention hybrid.
AGREEING = [
    ("resnet18", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64),
    ("convnext_atto", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("mobilenetv3_small_100", {}, 64),
    ("fastvit_t8", {}, 64),
    ("swin_tiny_patch4_window7_224", {}, 224),
    ("levit_128s", {}, 224),
    ("coat_lite_tiny", {"img_size": 64}, 64),
]


def _model(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def _flop_counter_mode(model: torch.nn.Module, size: int) -> dict:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_flop_counts()["Global"]


@pytest.mark.parametrize(("name", "kwargs", "size"), AGREEING, ids=[case[0] for case in AGREEING])
def test_the_count_is_flop_counter_modes_op_by_op(name, kwargs, size):
    model = _model(name, kwargs)
    expected = _flop_counter_mode(model, size)
    counter = _FlopCounter()
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size))
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # torch leaves it out (see below)
    assert {op: n for op, n in counter.counts.items() if op is not cpu_attention} == expected
    assert count_macs(model, (3, size, size)) == sum(counter.counts.values()) // 2 > 0


def test_a_vits_fused_attention_counts_on_a_cpu_as_on_any_device():
    """torch's table prices fused attention on CUDA and meta but not on the CPU: the count would depend on the
    device a check ran on. Here it does not: the CPU's equals the meta device's (which dispatches the priced op)."""
    model = _model("vit_tiny_patch16_224", {"img_size": 64})
    on_cpu = count_macs(model, (3, 64, 64))
    with torch.device("meta"):
        on_meta = count_macs(_model("vit_tiny_patch16_224", {"img_size": 64}), (3, 64, 64))
    assert on_cpu == on_meta > sum(_flop_counter_mode(model, 64).values()) // 2


@pytest.mark.parametrize("name", ["pit_ti_224", "pit_ti_distilled_224"])
def test_pit_is_counted(name):
    """PiT hands its class-token parameter to a submodule: FlopCounterMode's module tracker fails on it under inference
    mode ('NoneType' object has no attribute 'next_functions'), and every trial of a PiT search failed with it."""
    model = _model(name, {})
    macs = count_macs(model, (3, 224, 224))
    assert 650e6 < macs < 750e6  # PiT-Ti: ~0.7 GMACs with its attention (~0.5 G were it left out, as torch does)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_count_the_same(dtype):
    """The input is built in the parameters' dtype; the formulas price shapes, so the count does not change."""
    model = _model("resnet18", {})
    dense = count_macs(model, (3, 64, 64))
    assert count_macs(model.to(dtype), (3, 64, 64)) == dense


def test_a_model_on_the_meta_device_is_counted_without_computing():
    with torch.device("meta"):
        model = _model("resnet18", {})
    assert count_macs(model, (3, 64, 64)) == count_macs(_model("resnet18", {}), (3, 64, 64))


def test_masked_zeros_still_count():
    model = _model("resnet18", {})
    dense = count_macs(model, (3, 64, 64))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    assert count_macs(model, (3, 64, 64)) == dense


def test_cond_counts_its_larger_branch():
    class Branching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: self.linear(self.linear(x)), lambda x: self.linear(x), (x,))

    model = Branching()
    assert count_macs(model, (8,)) == 2 * 8 * 8  # two 1×8 by 8×8 products, whichever branch runs
