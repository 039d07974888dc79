"""Internal-state alignment (STARFISH-style): make the pruned network's internal states match the dense network's
on a small set of unlabelled images, with the masks held fixed.

The loss, for the aligned states l (each block's residual-stream output for a ViT, each stage's output for a CNN):

    L = (1/|l|) Σ_l ‖h_l(pruned) − h_l(dense)‖² / ‖h_l(dense)‖²  +  w · τ² · KL(softmax(z_dense/τ) ‖ softmax(z/τ))

The per-state normalisation ("relative") puts deep and shallow states on one scale; `normalize: none` uses the
plain mean squared error. A state whose width pruning changed has no counterpart and is left out; where none is
left (structured removal on a model without residual connections changes every stage's width, or the model has no
state align recognises: MViTv2, Twins), the logits are aligned instead (the KL term, weight at least 1). The
paper's exact loss is not public (METHODS.md §1): this is a reconstruction, and its options (`states`,
`normalize`, `logit_weight`, `temperature`) are there to be measured.
"""

from __future__ import annotations

import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.heal.base import HealMethod, HealRequest, register, trained
from autoprune.models import internal_states
from autoprune.train import logit_kl

STATE_CHOICES = ("all", "last")
NORMALIZE_CHOICES = ("relative", "none")


def alignment(model: nn.Module, request: HealRequest) -> "Alignment":
    """The alignment objective for `model`, with the request's options (checked here: a third-party caller may
    give any)."""
    options = request.options
    if options["states"] not in STATE_CHOICES or options["normalize"] not in NORMALIZE_CHOICES:
        raise AutopruneError(
            f"align: states must be one of {STATE_CHOICES} and normalize one of {NORMALIZE_CHOICES}, but got"
            f" states={options['states']!r}, normalize={options['normalize']!r}."
        )
    names = internal_states(model)
    if options["states"] == "last":
        names = names[-1:]
    # no recognised states (MViTv2, Twins): the loss compares the logits alone, as when every state changed width
    return Alignment(request.teacher, names, normalize=options["normalize"], temperature=options["temperature"],
                     logit_weight=options["logit_weight"])


align = trained(alignment)


class Alignment:
    """The alignment loss above. Binding hooks the named states of the model being trained and of the teacher
    (moved to the training device); releasing removes the hooks and sends the teacher back to the CPU."""

    def __init__(self, teacher: nn.Module, names: list[str], *, normalize: str, temperature: float,
                 logit_weight: float) -> None:
        self.teacher, self.names = teacher, names
        self.normalize, self.tau, self.weight = normalize, temperature, logit_weight
        self._captures: list[_capture] = []

    def bind(self, model: nn.Module, device: torch.device):
        teacher = self.teacher.eval().to(device)
        student_states, teacher_states = _capture(model, self.names), _capture(teacher, self.names)
        self._captures = [student_states, teacher_states]

        def loss(student: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = student(inputs)
            with torch.no_grad():
                target = teacher(inputs)
            terms = []
            for name in self.names:
                if not (isinstance(student_states.get(name), torch.Tensor)
                        and isinstance(teacher_states.get(name), torch.Tensor)):
                    continue  # never called itself (CoaT's ModuleList of blocks), or not one tensor (CrossViT's list)
                if student_states[name].shape != teacher_states[name].shape:
                    continue  # a state whose width pruning changed (a plain CNN's stage output) has no counterpart
                error = (student_states[name] - teacher_states[name]).pow(2).sum()
                if self.normalize == "relative":
                    error = error / teacher_states[name].pow(2).sum().clamp_min(1e-12)
                else:
                    error = error / teacher_states[name].numel()
                terms.append(error)
            if not terms:  # every aligned state changed width (structured removal on a model without residuals):
                # the logits are what is left to compare, so the loss still trains (a constant zero would not)
                return max(self.weight, 1.0) * logit_kl(logits, target, self.tau)
            total = torch.stack(terms).mean()
            if self.weight:
                total = total + self.weight * logit_kl(logits, target, self.tau)
            return total

        return loss

    def release(self) -> None:
        for capture in self._captures:
            capture.close()
        self._captures = []
        self.teacher.cpu()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_captures": []}  # hooks belong to the process that bound them


class _capture(dict):
    """Forward hooks that keep the latest output of each named module (dict: name → tensor)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._keep(name)) for name in names]

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self[name] = output

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


# One loss, two registered variants that differ in the weight of the logit term.
_VARIANTS = (
    ("align", 0.0,
     "Match the dense model's internal states (block / stage outputs) on unlabelled images (STARFISH-style)."),
    ("align_logits", 1.0, "Internal-state alignment plus a logit KL term to the dense model (unlabelled)."),
)
for _name, _logit_weight, _description in _VARIANTS:
    register(HealMethod(
        _name, align, _description,
        options={"states": "all", "normalize": "relative", "temperature": 2.0, "logit_weight": _logit_weight},
        choices={"states": STATE_CHOICES, "normalize": NORMALIZE_CHOICES},
        # Under ZeRO-3 the backward pass through the captured internal states fails inside DeepSpeed's parameter
        # coordinator ("active_backward_submodules is empty"); stages 1–2 work (tests/test_distributed.py).
        max_zero_stage=2,
        objective=alignment,
    ))
