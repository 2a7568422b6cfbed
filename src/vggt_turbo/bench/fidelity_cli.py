"""``vggt-turbo fidelity`` (and ``benchmarks/fidelity.py``): the fidelity harness's command line.

It parses the arguments, builds the model and the inputs, runs ``fidelity.measure`` and prints the rows as a
Markdown table, writing them as JSON with ``--out``. A separate module from the harness because the bench imports
the harness's metrics and has no use for this argument handling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..app.errors import UserError
from ..app.weights import load_model
from ..config import TurboConfig
from ..random_model import Size
from .fidelity import VARIANTS, Input, example_inputs, find_examples, measure, synthetic_inputs, table

log = logging.getLogger(__name__)

HELP = "errors of the approximate vggt-turbo configurations against the exact one"
RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS: these errors only check that the harness and the approximations run; they are not evidence "
    "of accuracy (pass --weights PATH to a VGGT checkpoint for that)"
)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"frame counts must be >= 1, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command's arguments, shared by ``vggt-turbo fidelity`` and ``benchmarks/fidelity.py``.

    ``--verbose`` defaults to SUPPRESS so that, under ``vggt-turbo``, it does not reset the top-level ``-v``."""
    p.add_argument("--frames", type=_ints, help="frame counts (default: 2,4 on the CPU, 2,8,20,50 on CUDA)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--inputs", default="examples,synthetic", help="examples, synthetic, or both (comma-separated)")
    p.add_argument("--examples", type=Path, help="folder of example scenes (<scene>/images); default: $VGGT_EXAMPLES "
                   "or shared/data/vggt-examples in or beside the working directory")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--size", choices=("small", "full"), help="model size (default: full on CUDA, small on the CPU)")
    p.add_argument("--weights", help="a local VGGT checkpoint (.pt/.pth/.safetensors, or a save_pretrained folder)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant on CUDA (default 3)")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log each row as it is measured, and the patching")
    p.set_defaults(func=command)
    return p


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``vggt-turbo fidelity``."""
    add_arguments(subparsers.add_parser("fidelity", help=HELP, description=HELP))


def _variants(spec: str) -> dict[str, TurboConfig]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise UserError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return {n: VARIANTS[n] for n in names}


def _cases(args: argparse.Namespace, size: Size, frames: Sequence[int]) -> list[Input]:
    kinds = {s.strip() for s in args.inputs.split(",") if s.strip()}
    if not kinds or kinds - {"examples", "synthetic"}:
        raise UserError(f"--inputs takes examples, synthetic or both, got {args.inputs!r}")
    cases = []
    if "examples" in kinds:
        root = args.examples or find_examples()
        if root is None or not root.is_dir():
            where = root or "shared/data/vggt-examples"
            raise UserError(f"no example scenes at {where}: pass --examples or --inputs synthetic")
        cases += example_inputs(root, frames, size)
    if "synthetic" in kinds:
        cases += synthetic_inputs(frames, size)
    return cases


def _model(weights: Optional[str], size: Size) -> tuple[nn.Module, str]:
    if weights is not None and not Path(weights).expanduser().exists():
        raise UserError(f"--weights takes a local checkpoint; {weights} does not exist")
    path = str(Path(weights).expanduser()) if weights is not None else None
    loaded = load_model(path, random_weights=weights is None, size=size)
    return loaded.model, loaded.source


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``command`` does but printing and writing: the results as a JSON-ready dict."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device")
    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    size: Size = args.size or ("full" if device.type == "cuda" else "small")
    frames = args.frames or ([2, 8, 20, 50] if device.type == "cuda" else [2, 4])
    variants = _variants(args.variants)
    model, source = _model(args.weights, size)
    if args.weights is None:
        log.warning("%s", RANDOM_WEIGHTS_NOTE)
    rows = measure(model.to(device), _cases(args, size, frames), variants, args.repeats)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": size,
        "weights": source,
        "random_weights": args.weights is None,
        "note": RANDOM_WEIGHTS_NOTE if args.weights is None else None,
        "reference": "upstream in fp32 (no autocast, TF32 off), same inputs; rows 'upstream' (bf16 autocast, the "
        "noise floor) and 'exact' first",
        "autocast": "bfloat16",
    }
    configs = {
        name: {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.as_dict().items()}
        for name, cfg in variants.items()
    }
    return _json_safe({"meta": meta, "variants": configs, "rows": rows})


def command(args: argparse.Namespace) -> int:
    """Measure, print the table, write ``--out``: 0, or 2 after one logged line for a problem the user can fix."""
    try:
        results = run(args)
    except UserError as err:
        log.error("%s", err)
        return 2
    print(table(results["rows"]))
    if results["meta"]["random_weights"]:
        print(f"\n{RANDOM_WEIGHTS_NOTE}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        log.info("wrote %s", args.out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``benchmarks/fidelity.py``."""
    args = add_arguments(argparse.ArgumentParser(description=HELP)).parse_args(argv)
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return command(args)
