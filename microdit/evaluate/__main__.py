"""Evaluate a MicroDiT checkpoint.

    python -m microdit.evaluate --checkpoint runs/demo/stage4 --suite shapes                 # offline, CPU
    python -m microdit.evaluate --checkpoint DIR --suite fid30k --coco-root /data/coco --device cuda
    python -m microdit.evaluate --checkpoint DIR --suite fid30k --num-samples 5000 ...       # FID-5K
    python -m microdit.evaluate --checkpoint DIR --suite geneval --device cuda
    python -m microdit.evaluate --checkpoint DIR --suite fid30k clip --coco-root /data/coco

Generated images are kept under the output folder: a rerun only makes the missing ones.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import fields

from microdit.cli import run_cli

from .config import SUITES, EvalConfig


def _field_help() -> dict:
    """The inline comments of EvalConfig, as --help text."""
    import inspect
    import re
    from . import config
    out = {}
    for line in inspect.getsource(config.EvalConfig).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv=None) -> int:
    helps = _field_help()
    ap = argparse.ArgumentParser(prog="python -m microdit.evaluate", description=__doc__,
                                 formatter_class=_Formatter)
    ap.add_argument("--checkpoint", required=True, help=helps.get("checkpoint"))
    ap.add_argument("--suite", nargs="+", default=["shapes"], choices=SUITES, help=helps.get("suites"))
    for f in fields(EvalConfig):
        if f.name in ("checkpoint", "suites"):
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0].replace("None", "").strip(" |"), str)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=helps.get(f.name))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: $OMP_NUM_THREADS or torch's)")
    args = vars(ap.parse_args(argv))
    import torch
    threads = args.pop("threads") or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None)
    if threads:
        torch.set_num_threads(threads)
    from .run import evaluate, format_report
    checkpoint, suites = args.pop("checkpoint"), args.pop("suite")
    report = evaluate(checkpoint, suites, **args)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    run_cli(main)
