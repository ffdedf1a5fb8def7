"""Stop training at the first non-finite loss, before it reaches the weights.

A NaN/inf loss backpropagates NaN into every gradient, and one optimizer step then
poisons all weights (and, through AdamW's moments, every later step). Raising in
`after_loss` -- before backward and step run -- keeps the weights and the last
checkpoint (CheckpointCB saves only after complete batches/epochs) intact.
"""

from __future__ import annotations

import torch

from ..errors import TrainingError
from .callback import Callback

__all__ = ["NaNGuardCB"]


class NaNGuardCB(Callback):
    """Raise TrainingError when the loss (or, with `check_grads`, a gradient) is NaN or infinite.

    Gradient checks cost a pass over all gradients per step and must stay off with a float16
    GradScaler (it handles overflowing gradients itself by skipping the step).
    """

    order = -20

    def __init__(self, check_grads: bool = False):
        self.check_grads = check_grads

    def _fail(self, learn, what: str) -> None:
        phase = "training" if learn.training else "validation"
        raise TrainingError(
            f"{what} at epoch {learn.epoch} (counting from 0), {phase} batch {learn.iter}, after "
            f"{learn.step} optimizer steps; the weights were not updated with it and the last checkpoint "
            "is intact: lower the learning rate (try lr_find), turn mixed precision off, or check the data "
            "for NaN/inf")

    def after_loss(self, learn) -> None:
        loss = learn.loss.detach()
        if not bool(torch.isfinite(loss).all()):
            self._fail(learn, f"the loss became {loss.float().mean().item()}")

    def after_backward(self, learn) -> None:
        if not self.check_grads:
            return
        grads = [(name, p.grad) for name, p in learn.model.named_parameters() if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):  # one sync
            name = next(name for name, g in grads if not bool(torch.isfinite(g).all()))
            self._fail(learn, f"the gradient of {name} holds NaN/inf")
