"""The `minidiffusion` command: parses arguments and calls the library; no logic of its own.

Every command ends by printing one JSON line summarising its result. Errors meant for the
user (`MinidiffusionError`) print as one sentence on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import MinidiffusionError

SAMPLE_PRECISION = "auto"  # the network's precision while sampling: bf16 where it is fast, else fp32
PRECISION_HELP = "network precision while sampling (auto: bf16 on CUDA and CPUs with AVX512-bf16, else fp32)"

__all__ = ["main"]


def _cmd_train_classifier(args) -> dict:
    from .classifier import ClassifierConfig, train_classifier
    from .config import apply_overrides, from_dict, load_preset

    preset = args.preset or "fmnist-classifier"
    saved = Path(args.out) / "config.toml"
    if args.resume and args.preset is None and not args.overrides and args.epochs is None and saved.is_file():
        preset = str(saved)  # a bare --resume continues with the run's own settings
    cfg = from_dict(ClassifierConfig, load_preset(preset))
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    cfg = apply_overrides(cfg, overrides)
    return train_classifier(cfg, args.out, resume=args.resume, progress=not args.quiet, replace=args.replace)


def _cmd_train(args) -> dict:
    from .config import apply_overrides, from_dict, load_preset
    from .diffusion.training import DiffusionConfig, train_diffusion

    cfg = apply_overrides(from_dict(DiffusionConfig, load_preset(args.preset)), list(args.overrides))
    return train_diffusion(cfg, args.out, resume=args.resume, progress=not args.quiet, replace=args.replace)


def _cmd_sample(args) -> dict:
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from .data.images import save_grid, save_labelled_grid

    model = _load_model(args)
    out = Path(args.out)
    start = time.time()
    kw = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance, precision=args.precision)
    x, ids = model.sample(args.n, labels=args.label, seed=args.seed, **kw)
    seconds = time.time() - start
    k = model.cfg.model.n_classes
    if ids is not None and not args.label and args.n % k == 0 and len(model.class_names) == k:
        order = torch.sort(ids, stable=True).indices  # one labelled row per class
        save_labelled_grid(x[order], model.class_names, out)
    else:
        save_grid(x, out, scale=2)
    prog = model.progression(out.with_name(out.stem + "-progression.png"), n=min(4, args.n), seed=args.seed,
                             labels=args.label, **kw)
    npz = out.with_suffix(".npz")
    np.savez_compressed(npz, images=x.numpy(), labels=(ids.numpy() if ids is not None else np.array([])))
    return {"grid": str(out), "progression": str(prog), "npz": str(npz), "n": args.n,
            "sampler": kw["sampler"] or model.cfg.sampler, "steps": kw["steps"] or model.cfg.steps,
            "nfe": model.nfe(args.sampler, args.steps), "precision": args.precision, "seconds": round(seconds, 2)}


def _load_model(args):
    from .diffusion.pipeline import DiffusionModel
    from .learner.callbacks import resolve_device

    device = resolve_device(args.device)
    if args.pretrained:
        return DiffusionModel.from_pretrained(args.pretrained, device=device)
    if args.run_dir:
        return DiffusionModel.from_run(args.run_dir, device=device)
    raise MinidiffusionError("give a run directory or --pretrained NAME (e.g. --pretrained fmnist)")


def _cmd_eval(args) -> dict:
    from .evaluate import evaluate_model
    from .metrics.features import load_feature_network
    from .runs import append_metrics

    model = _load_model(args)
    features = load_feature_network(args.features)
    result = evaluate_model(model, n=args.n, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                            seed=args.seed, feature_net=features, precision=args.precision)
    result["model"] = args.run_dir or f"pretrained:{args.pretrained}"
    if args.run_dir:
        append_metrics(args.run_dir, {"phase": "eval", **result})
    return result


def _cmd_data(args) -> dict:
    from .data.fashion_mnist import OFFICIAL_URL, download_fashion_mnist, find_fashion_mnist

    if args.dest is None:
        try:
            found = find_fashion_mnist()
            print(f"Fashion-MNIST is already available at {found}")
            return {"path": str(found), "downloaded": False}
        except MinidiffusionError:
            pass
    path = download_fashion_mnist(args.dest, args.url or OFFICIAL_URL)
    return {"path": str(path), "downloaded": True}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `minidiffusion` command."""
    from .learner.precision import PRECISIONS

    p = argparse.ArgumentParser(prog="minidiffusion", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    tc = sub.add_parser("train-classifier", help="train the Fashion-MNIST ResNet classifier")
    tc.add_argument("--out", required=True, help="run directory to write (config, metrics, checkpoints, PNGs)")
    tc.add_argument("--epochs", type=int, default=None, help="number of epochs (default: the preset's)")
    tc.add_argument("--preset", default=None,
                    help="preset name or .toml path (default fmnist-classifier; with a bare --resume, the run's own)")
    tc.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tc.add_argument("--replace", action="store_true", help="move an existing run in --out aside and start anew")
    tc.add_argument("--quiet", action="store_true", help="no progress bars")
    tc.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=3e-3")
    tc.set_defaults(func=_cmd_train_classifier)

    tr = sub.add_parser("train", help="train a diffusion model from a preset (default data: Fashion-MNIST)")
    tr.add_argument("preset", help="preset name (fmnist, fmnist-ddpm, fmnist-cosine, fmnist-edm) or .toml path")
    tr.add_argument("--out", required=True, help="run directory to write")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--replace", action="store_true", help="move an existing run in --out aside and start anew")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. epochs=5 minutes=10 data=PATH model.channels=[32,64,128]")
    tr.set_defaults(func=_cmd_train)

    sa = sub.add_parser("sample", help="sample images from a trained run or a shipped model")
    sa.add_argument("run_dir", nargs="?", help="run directory written by `minidiffusion train`")
    sa.add_argument("--pretrained", default=None, help="a shipped model instead of a run directory (fmnist)")
    sa.add_argument("--sampler", default=None, help="ddpm, ddim, euler, euler_ancestral, heun, lms, dpmpp_2m")
    sa.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    sa.add_argument("--n", type=int, default=40, help="number of images")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--label", action="append", default=None,
                    help="class name or index (repeatable); default: balanced over all classes")
    sa.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    sa.add_argument("--device", default="auto")
    sa.add_argument("--precision", default=SAMPLE_PRECISION, choices=PRECISIONS, help=PRECISION_HELP)
    sa.add_argument("--out", default="samples.png", help="grid PNG to write (plus -progression.png and .npz)")
    sa.set_defaults(func=_cmd_sample)

    ev = sub.add_parser("eval", help="FID/KID of a model's samples against the Fashion-MNIST test set")
    ev.add_argument("run_dir", nargs="?", help="run directory written by `minidiffusion train`")
    ev.add_argument("--pretrained", default=None, help="a shipped model instead of a run directory (fmnist)")
    ev.add_argument("--sampler", default=None)
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--n", type=int, default=2048, help="number of samples (and of reals for the floor)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--features", default=None,
                    help="feature network: a classifier run dir or .safetensors (default: the shipped one)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--precision", default=SAMPLE_PRECISION, choices=PRECISIONS, help=PRECISION_HELP)
    ev.set_defaults(func=_cmd_eval)

    d = sub.add_parser("data", help="download a data set into the user cache (verified by SHA-256)")
    d.add_argument("dataset", choices=["fashion-mnist"])
    d.add_argument("--dest", default=None, help="folder to download into (default: the user cache)")
    d.add_argument("--url", default=None, help="mirror to download from (default: the official one)")
    d.set_defaults(func=_cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); return the exit status."""
    from .runs import print_result

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops its positional list at an option)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        result = args.func(args)
    except MinidiffusionError as e:
        print(f"minidiffusion: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minidiffusion: interrupted; the last checkpoint (if any) is intact, continue with --resume",
              file=sys.stderr)
        return 130
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
