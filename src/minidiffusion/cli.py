"""The `minidiffusion` command: parses arguments and calls the library; no logic of its own.

Every command ends by printing one JSON line summarising its result. Errors meant for the
user (`MinidiffusionError`) print as one sentence on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import MinidiffusionError

__all__ = ["main"]


def _cmd_train_classifier(args) -> dict:
    from .classifier import ClassifierConfig, train_classifier
    from .config import apply_overrides, from_dict, load_preset

    cfg = from_dict(ClassifierConfig, load_preset(args.preset))
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    cfg = apply_overrides(cfg, overrides)
    return train_classifier(cfg, args.out, resume=args.resume, progress=not args.quiet, replace=args.replace)


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
    p = argparse.ArgumentParser(prog="minidiffusion", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    tc = sub.add_parser("train-classifier", help="train the Fashion-MNIST ResNet classifier")
    tc.add_argument("--out", required=True, help="run directory to write (config, metrics, checkpoints, PNGs)")
    tc.add_argument("--epochs", type=int, default=None, help="number of epochs (default: the preset's)")
    tc.add_argument("--preset", default="fmnist-classifier", help="preset name or .toml path")
    tc.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tc.add_argument("--replace", action="store_true", help="move an existing run in --out aside and start anew")
    tc.add_argument("--quiet", action="store_true", help="no progress bars")
    tc.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=3e-3")
    tc.set_defaults(func=_cmd_train_classifier)

    d = sub.add_parser("data", help="download a data set into the user cache (verified by SHA-256)")
    d.add_argument("dataset", choices=["fashion-mnist"])
    d.add_argument("--dest", default=None, help="folder to download into (default: the user cache)")
    d.add_argument("--url", default=None, help="mirror to download from (default: the official one)")
    d.set_defaults(func=_cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); return the exit status."""
    from .runs import print_result

    args = build_parser().parse_args(argv)
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
