"""The Learner and its callbacks: a training loop whose behaviour is all callbacks (docs/design.md)."""
from ..device import default_device, resolve_device, synchronize
from .activations import ActivationStatsCB, LayerStats, default_layers
from .callback import Callback, CancelBatchException, CancelEpochException, CancelFitException, run_cbs
from .callbacks import BatchTransformCB, MetricsCB, SingleBatchCB, TrainCB, accuracy
from .checkpoint import (
    CheckpointCB,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from .device import DeviceCB, to_device
from .ema import EMACB, copy_without_hooks, ema_decay
from .learner import STAGES, Learner
from .nan_guard import NaNGuardCB
from .precision import MixedPrecisionCB, precision_callback, precision_of
from .progress import ProgressCB
from .schedules import BatchSchedCB, LRFinderCB, OneCycleCB, lr_find, plot_lr_find, suggest_lr
from .state import capture_rng, check_state_dict, flatten_state, restore_rng, unflatten_state
from .time_budget import TimeBudgetCB, one_cycle_lr

__all__ = [
    # core
    "Learner", "Callback", "CancelFitException", "CancelEpochException", "CancelBatchException", "run_cbs",
    "STAGES", "TimeBudgetCB", "one_cycle_lr",
    # basic callbacks
    "TrainCB", "DeviceCB", "MetricsCB", "SingleBatchCB", "BatchTransformCB", "default_device", "resolve_device",
    "synchronize", "to_device", "accuracy",
    # training callbacks
    "ProgressCB", "BatchSchedCB", "OneCycleCB", "LRFinderCB", "lr_find", "suggest_lr", "plot_lr_find",
    "MixedPrecisionCB", "precision_callback", "precision_of", "EMACB", "copy_without_hooks", "ema_decay",
    "NaNGuardCB", "ActivationStatsCB", "LayerStats", "default_layers",
    # checkpoints and training state
    "CheckpointCB", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
    "load_weights", "flatten_state", "unflatten_state", "capture_rng", "restore_rng", "check_state_dict",
]
