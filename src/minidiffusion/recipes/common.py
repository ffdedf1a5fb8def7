"""What every recipe shares: how long to fit."""

from __future__ import annotations

__all__ = ["fit_epochs", "BUDGET_EPOCHS"]

BUDGET_EPOCHS = 10_000  # with a `minutes` budget the clock ends training, never this many epochs


def fit_epochs(cfg) -> int:
    """Return how many epochs to pass to `Learner.fit`: cfg.epochs, or BUDGET_EPOCHS when `minutes` > 0."""
    return BUDGET_EPOCHS if getattr(cfg, "minutes", 0) > 0 else cfg.epochs
