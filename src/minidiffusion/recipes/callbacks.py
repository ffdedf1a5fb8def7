"""The callbacks that turn the generic Learner into a diffusion trainer, and FID during training.

`DiffusionCB` replaces the Learner's `predict` stage: it takes the clean batch (images in
[-1, 1], optional labels), lets the objective noisify it and computes the objective's loss,
dropping labels to the "no label" index with probability `cond_drop` so the same network
learns the unconditional model that classifier-free guidance needs.

`FIDCB` scores sample quality during training: the loss of a diffusion model says little about
it late in training; FID on a few hundred samples does (noisily: compare it with the reals floor
at the same N). It runs after an epoch's validation, so its time is not charged to a `minutes=`
budget (TimeBudgetCB counts training batches only), and it is given a *sample function*, so it
knows nothing of how samples are made. Each score is printed, appended to `metrics.jsonl` as
{"phase": "fid", ...} and kept in `history`; ProgressCB draws it beside the loss curve in `loss.png`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..data.images import check_range
from ..diffusion.objectives import Objective
from ..learner import Callback
from ..learner.distributed import gather, shard_range
from ..nn.unet import drop_labels
from ..runs import append_metrics

__all__ = ["DiffusionCB", "RangeCheckCB", "FIDCB", "SampleFn"]

SampleFn = Callable[..., torch.Tensor]  # (learn, n, seed) -> images [n, C, H, W] in [-1, 1]


class DiffusionCB(Callback):
    """Replace `predict`/`get_loss`: loss = objective.loss(model, x0, **cond) on the clean batch.

    `cond` holds the labels (dropped to the null label with probability `cond_drop`), or whatever
    `condition(learn) -> dict` returns (text-to-image: token states, mask and pooled vector of the
    batch's captions). Validation batches use a fixed generator (re-seeded each epoch), so
    validation losses of different epochs see the same noise and are comparable.
    """

    order = 10

    def __init__(self, objective: Objective, n_classes: int = 0, cond_drop: float = 0.0, seed: int = 0,
                 condition: Callable[..., dict] | None = None):
        self.objective, self.n_classes, self.cond_drop, self.seed = objective, n_classes, cond_drop, seed
        self.condition = condition

    def before_epoch(self, learn) -> None:
        self._valid_gen = None
        if not learn.training:
            dev = next(learn.model.parameters()).device
            self._valid_gen = torch.Generator(dev).manual_seed(self.seed + 12345)

    def predict(self, learn) -> None:
        x0 = learn.batch[0]
        cond = {}
        if self.condition is not None:
            cond = self.condition(learn)
        elif self.n_classes:
            labels = learn.batch[1]
            if learn.training and self.cond_drop:
                labels = drop_labels(labels, self.cond_drop, self.n_classes)
            cond["label"] = labels
        learn.preds = None
        learn.loss = self.objective.loss(learn.model, x0, generator=self._valid_gen, **cond)

    def get_loss(self, learn) -> None:
        pass  # computed together with the prediction in `predict`


class RangeCheckCB(Callback):
    """Check once, on the first training batch, that images follow the [-1, 1] contract."""

    order = -4

    def before_fit(self, learn) -> None:
        self.done = False

    def before_batch(self, learn) -> None:
        if not self.done:
            check_range(learn.batch[0], "training images")
            self.done = True


class FIDCB(Callback):
    """Score FID/KID of `n` samples from `sample(learn, n, seed)` every `every` epochs and for the final weights.

    With several processes (torchrun) the n samples are split over them and their features gathered.
    `sample` returns images [n, C, H, W] in [-1, 1] (the diffusion recipe samples with the EMA weights,
    in the precision it trains in, labels balanced over the classes, from its own seeded generator so
    the training RNG, and with it exact `--resume`, is untouched). The feature network defaults to the
    one shipped for `data` (Fashion-MNIST: 1x32x32 images; emoji: 3x64x64) unless `feature_net` is given; its
    low-contrast guard is off: an early model's washed-out samples are a result for FID to score, not
    a range mistake. `history` holds {epoch, step, fid, kid, kid_std, n, seconds} records.
    """

    order = 60  # after MetricsCB (its record is complete), before ProgressCB (which plots this)
    skip_in_lr_find = True
    state_key = "FIDCB"

    def __init__(self, sample: SampleFn, every: int = 1, n: int = 500, seed: int = 0, feature_net=None,
                 show: bool = True, data: str = "fashion-mnist"):
        if every < 1 or n < 2:
            raise ValueError(f"FIDCB needs every >= 1 and n >= 2, got every={every}, n={n}")
        self.sample, self.every, self.n, self.seed = sample, every, n, seed
        self.feature_net, self.show, self.data = feature_net, show, data
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
        """Sample, score the samples, log and return the record.

        Under torchrun each process makes its `shard_range` of the n samples (from seed + the shard's first index:
        with one process, the seed itself) and their features; the features are gathered, so every process scores
        the same n samples once, as one process would score n samples of its own.
        """
        from ..metrics.evaluate import default_feature_network, reference_features, score_features
        from ..metrics.features import extract_features

        if self.feature_net is None:
            self.feature_net = default_feature_network(self.data, allow_unusual=True)
        if self.reference is None:
            self.reference = reference_features(self.feature_net, self.data)
        start = time.time()
        mine = shard_range(self.n)
        samples = self.sample(learn, len(mine), self.seed + mine.start)
        res = score_features(self.reference, gather(extract_features(self.feature_net, samples)), self.seed)
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
