"""``vggt-turbo plan --frames N --size WxH [--memory GiB | --gpu NAME] [--json]``: how many frames fit, before a run.

Arithmetic only (``vggt_turbo.planner``): no weights, no GPU, no torch import unless a device is asked about.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..planner import gpu_memory_gib, plan


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="predict peak GPU memory, time and the largest frame count per preset, without running",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, required=True, metavar="N", help="frames per sequence")
    p.add_argument("--size", type=_size, default=(518, 392), metavar="WxH",
                   help="preprocessed frame size, multiples of 14 (default: 518x392, upstream's crop of 4:3 images)")
    p.add_argument("--batch", type=int, default=1, help="sequences per call (default: 1)")
    p.add_argument("--memory", type=float, metavar="GiB", help="GPU memory to plan for")
    p.add_argument("--gpu", metavar="NAME", help="GPU name (H100, H200: calibrated seconds; RTX4090, A100-40GB, ...: "
                   "its memory when --memory is not given)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    memory = args.memory
    if memory is None and args.gpu and gpu_memory_gib(args.gpu) is None:
        print(f"vggt-turbo plan: error: unknown GPU {args.gpu!r}: give --memory GiB", file=sys.stderr)
        return 2
    try:
        result = plan(args.frames, height=args.size[1], width=args.size[0], batch=args.batch, memory=memory, gpu=args.gpu)
    except ValueError as exc:
        print(f"vggt-turbo plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=1) if args.json else result.table())
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"WxH, e.g. 518x392; got {text!r}") from None
    return w, h
