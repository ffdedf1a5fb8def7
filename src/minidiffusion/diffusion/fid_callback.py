"""FID during training: every K epochs, sample a small set with the EMA weights and score it.

The loss of a diffusion model says little about sample quality late in training; FID on a few
hundred samples does (noisily: compare it with the reals floor at the same N, printed once).
The callback runs after an epoch's validation, so the time it takes is not charged to a
`minutes=` budget (TimeBudgetCB counts training batches only). Sampling uses its own seeded
generator, so it leaves the global RNG — and with it exact `--resume` — untouched.

Each score is printed, appended to `metrics.jsonl` as {"phase": "fid", ...} and kept in
`history`; ProgressCB draws it as a second panel next to the loss curve in `loss.png`.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm.auto import tqdm

from ..learner import Callback
from ..runs import append_metrics

__all__ = ["FIDCB"]


class FIDCB(Callback):
    """Score FID/KID of `n` samples every `every` epochs and once more for the final weights.

    `cfg` is the run's DiffusionConfig (objective, sampler defaults); labels of a conditional
    model are balanced over its classes, like the test set; the network samples in the precision
    it trains in (`learn.precision`). The feature network defaults to the shipped
    Fashion-MNIST classifier, so images must be 1x32x32 unless `feature_net` is given. Its
    low-contrast guard is off: samples come from our own pipeline, in [-1, 1] by construction, and
    an early model's washed-out samples are a result for FID to score, not a range mistake.
    `history` holds {epoch, step, fid, kid, kid_std, n, seconds} records.
    """

    order = 60  # after MetricsCB (its record is complete), before ProgressCB (which plots this)
    skip_in_lr_find = True

    def __init__(self, cfg, every: int = 1, n: int = 500, sampler: str | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0, feature_net=None,
                 show: bool = True):
        if every < 1 or n < 2:
            raise ValueError(f"FIDCB needs every >= 1 and n >= 2, got every={every}, n={n}")
        self.cfg, self.every, self.n = cfg, every, n
        self.sampler, self.steps, self.guidance, self.seed = sampler, steps, guidance, seed
        self.feature_net, self.show = feature_net, show
        self.reference = None  # the test set's features, loaded at the first score
        self.history: list[dict] = []

    def after_epoch(self, learn) -> None:
        if learn.training and learn.do_valid:
            return  # wait for the validation phase of this epoch
        if (learn.epoch + 1) % self.every == 0:
            self.score(learn)

    def after_fit(self, learn) -> None:
        if learn.step and not (self.history and self.history[-1]["step"] == learn.step):
            self.score(learn)  # the final weights, e.g. when a time budget ended the fit mid-epoch

    def score(self, learn) -> dict:
        """Sample with the EMA weights (or the model), score them, log and return the record."""
        from ..evaluate import evaluate_samples, reference_features
        from ..metrics.features import load_feature_network
        from .pipeline import DiffusionModel

        if self.feature_net is None:
            self.feature_net = load_feature_network(allow_unusual=True)
        if self.reference is None:
            self.reference = reference_features(self.feature_net)

        start = time.time()
        net = getattr(learn, "ema_model", None) or learn.model
        device = next(net.parameters()).device
        dm = DiffusionModel(net, self.cfg, device=device)
        samples, _ = dm.sample(self.n, sampler=self.sampler, steps=self.steps, guidance=self.guidance,
                               seed=self.seed, precision=getattr(learn, "precision", "fp32"))  # as it trains
        res = evaluate_samples(samples, self.feature_net, with_reals=False, seed=self.seed, reference=self.reference)
        rec = {"epoch": learn.epoch, "phase": "fid", "step": learn.step, "fid": res["fid"], "kid": res["kid"],
               "kid_std": res["kid_std"], "n": self.n, "seconds": round(time.time() - start, 1)}
        self.history.append(rec)
        if learn.path is not None:
            append_metrics(learn.path, rec)
        if self.show:
            tqdm.write(f"epoch {learn.epoch}: FID {rec['fid']:.4f}  KID {rec['kid']:.2e} "
                       f"(n={self.n}, {rec['seconds']} s)", file=sys.stdout)
        return rec

    def curve(self) -> tuple[str, list[tuple[int, float]]]:
        """Return ("FID (n=N)", [(optimizer step, fid)]) for ProgressCB's plot."""
        return f"FID (n={self.n})", [(r["step"], r["fid"]) for r in self.history]

    def state_dict(self) -> dict:
        """Return the score history as a float64 tensor [k, 6] for checkpoints."""
        keys = ("epoch", "step", "fid", "kid", "kid_std", "seconds")
        return {"history": torch.tensor([[float(r[k]) for k in keys] for r in self.history],
                                        dtype=torch.float64).reshape(-1, len(keys))}

    def load_state_dict(self, state: dict) -> None:
        """Restore the score history from `state_dict()`."""
        self.history = [{"epoch": int(e), "phase": "fid", "step": int(s), "fid": f, "kid": k, "kid_std": ks,
                         "n": self.n, "seconds": sec} for e, s, f, k, ks, sec in state["history"].tolist()]
