"""The Learner and its callbacks."""
from .learner import (STAGES, Callback, CancelBatchException, CancelEpochException, CancelFitException,
                      Learner, run_cbs)

__all__ = ["Learner", "Callback", "CancelFitException", "CancelEpochException", "CancelBatchException",
           "run_cbs", "STAGES"]
