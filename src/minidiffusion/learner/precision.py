"""Mixed precision: autocast around predict + loss, fp32 master weights, loss scaling for fp16.

The model's parameters stay float32 (the "master weights" the optimizer updates); inside
`torch.autocast` matmuls and convolutions run in bfloat16/float16 and reductions in float32.
float16 has a narrow exponent range, so small gradients underflow: `torch.amp.GradScaler`
multiplies the loss before backward, unscales the gradients before the step, and skips steps
whose gradients overflowed (lowering the scale). bfloat16 has float32's range and needs no scaler.
"""

from __future__ import annotations

import torch

from ..device import resolve_precision
from ..errors import ConfigError
from .callback import Callback

__all__ = ["MixedPrecisionCB", "precision_callback", "precision_of"]


class MixedPrecisionCB(Callback):
    """Autocast predict + loss to `dtype` on CUDA (default bfloat16; float16 adds a GradScaler).

    `enabled=None` turns it on only when the model is on CUDA (on CPU it prints one note and does
    nothing); `enabled=True` forces autocast on the model's device (CPU autocast for bfloat16/float16);
    `enabled=False` turns it off. Provides the `backward`/`step` stages (order 10 > TrainCB) so a
    float16 scaler wraps them; `state_dict()` holds the scaler state for checkpoints.
    """

    order = 10
    state_key = "MixedPrecisionCB"

    def __init__(self, dtype: torch.dtype = torch.bfloat16, enabled: bool | None = None):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"MixedPrecisionCB dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        self.dtype, self.enabled = dtype, enabled
        self.active, self.scaler, self._ctx, self._noted = False, None, None, False
        self._pending: dict | None = None

    def before_fit(self, learn) -> None:
        param = next(learn.model.parameters(), None)
        self.device_type = param.device.type if param is not None else "cpu"
        self.active = self.enabled if self.enabled is not None else self.device_type == "cuda"
        if self.enabled is None and not self.active and not self._noted:
            print(f"MixedPrecisionCB: the model is on {self.device_type}, not CUDA: training in float32 "
                  "(pass enabled=True for CPU autocast)")
            self._noted = True
        use_scaler = self.active and self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device_type) if use_scaler else None
        if self.scaler is not None and self._pending:
            self.scaler.load_state_dict(self._pending)
        self._pending = None

    def before_predict(self, learn) -> None:
        if self.active:
            self._ctx = torch.autocast(self.device_type, dtype=self.dtype)
            self._ctx.__enter__()

    def _exit(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

    def after_loss(self, learn) -> None:
        self._exit()

    def cleanup_batch(self, learn) -> None:
        self._exit()  # an exception between predict and loss must not leave autocast switched on

    def backward(self, learn) -> None:
        loss = self.scaler.scale(learn.loss) if self.scaler is not None else learn.loss
        loss.backward()

    def step(self, learn) -> None:
        if self.scaler is None:
            learn.opt.step()
            return
        self.scaler.step(learn.opt)  # unscales the grads; skips the step if they hold inf/NaN
        self.scaler.update()

    def state_dict(self) -> dict:
        """Return the GradScaler state (scale, growth tracker; plain numbers), {} without a scaler."""
        return self.scaler.state_dict() if self.scaler is not None else dict(self._pending or {})

    def load_state_dict(self, state: dict) -> None:
        """Restore the GradScaler state from `state_dict()`."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
        else:
            self._pending = state


def precision_callback(precision: str, device: torch.device) -> tuple[str, MixedPrecisionCB | None]:
    """Resolve a config's precision ('auto' | 'bf16' | 'fp16' | 'fp32') for `device`.

    Returns (the resolved name, a MixedPrecisionCB to add, or None for fp32). 'auto' means bf16
    where `minidiffusion.device.bf16_is_fast`, else fp32.
    """
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return precision, None
    return precision, MixedPrecisionCB(torch.bfloat16 if precision == "bf16" else torch.float16, enabled=True)


def precision_of(learn) -> str:
    """Return the precision `learn` trains in: "bf16"/"fp16" when a MixedPrecisionCB autocasts, else "fp32"."""
    mp = learn.cb(MixedPrecisionCB)
    if mp is None or not (mp.enabled or mp.active):  # enabled=None: active once fit found CUDA
        return "fp32"
    return "bf16" if mp.dtype == torch.bfloat16 else "fp16"
