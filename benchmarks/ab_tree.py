#!/usr/bin/env python
"""This tree's preset against another commit's, and both against upstream, in one process, interleaved.

    git archive dff3d62 src | tar -x -C /tmp/old
    python benchmarks/ab_tree.py --other /tmp/old/src/vggt_turbo --frames 1,10,32,100 --out /tmp/ab_tree.json

Why: a goal such as "the new ``exact`` at least as fast as the former ``exact``" (issue #17) compares two commits.
Their bench runs were on different days, and upstream's own time, the yardstick of every ratio, moved between
them by more than the difference sought (1 frame: 76 vs 124 ms on one H200 kind). Here the other commit's package
is imported under another name (``--other``, the ``vggt_turbo`` folder of a checkout or ``git archive``; its
imports are relative, so it loads beside this one), and three deep copies of one full model (random weights,
seed 0) run on the same input: upstream unpatched, this tree's ``--preset`` and the other's. Each is called under
bf16 autocast as upstream's README runs it; per round each copy takes the median of ``--repeats`` calls between
CUDA events, round after round (``--rounds``), so clock and host drift hit all three alike. Reported per copy:
the median over rounds and every round's time, peak memory of a warm call above what was allocated before it, and each
patched copy's outputs against upstream-autocast's (``||a-b||/||b||``; the contract's errors against fp32 are
``vggt-turbo bench --precision``'s). Needs a CUDA GPU and memory for three copies of the model.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import logging
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch

import vggt_turbo
from ab_flag import ab_meta, forward_call, median_ms, write_report
from vggt_turbo.random_model import build_vggt, random_images

log = logging.getLogger("ab_tree")

OTHER = "vggt_turbo_other"  # the name the other commit's package is imported under
OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", type=Path, required=True, help="the other commit's vggt_turbo package folder")
    p.add_argument("--other-commit", default=None, help="its commit, for the report (default: read from --other)")
    p.add_argument("--preset", default="exact", help="the preset both trees apply (default %(default)s)")
    p.add_argument("--frames", default="1,10,32,100", help="frame counts, comma-separated (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default %(default)s)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per copy and round (default %(default)s)")
    p.add_argument("--large", type=int, default=32,
                   help="from this many frames on, 2 rounds of 2 calls (a call takes seconds; default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if not (args.other / "__init__.py").is_file():
        p.error(f"--other must be a vggt_turbo package folder (with __init__.py), got {args.other}")
    return args


def load_other(package: Path) -> ModuleType:
    """The package at ``package`` imported as ``OTHER``; its relative imports resolve inside it."""
    spec = importlib.util.spec_from_file_location(OTHER, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {package}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[OTHER] = module
    spec.loader.exec_module(module)
    return module


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def compare(base: torch.nn.Module, other: ModuleType, preset: str, frames: int, rounds: int,
            repeats: int) -> dict[str, Any]:
    images = random_images(frames, 518, seed=0).cuda()
    names = ("upstream", f"{preset} (this tree)", f"{preset} (other)")
    models = {name: copy.deepcopy(base).cuda() for name in names}
    vggt_turbo.apply_optimizations(models[names[1]], preset)
    other.apply_optimizations(models[names[2]], preset)
    calls = {name: forward_call(model, images) for name, model in models.items()}
    outputs, peak = {}, {}
    for name, call in calls.items():
        for _ in range(2):  # warm-up: compilation, CUDA-graph capture, caches
            outputs[name] = {k: v for k, v in call().items() if k in OUTPUTS}
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()  # the copies, their caches and graphs, the outputs kept so far
        torch.cuda.reset_peak_memory_stats()
        outputs[name] = {k: v for k, v in call().items() if k in OUTPUTS}
        torch.cuda.synchronize()
        peak[name] = round((torch.cuda.max_memory_allocated() - held) / 2**30, 3)  # what one more call adds at most
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            times[name].append(round(median_ms(calls[name], repeats), 3))
    result: dict[str, Any] = {"frames": frames, "rounds": rounds, "repeats": repeats}
    upstream_ms = statistics.median(times["upstream"])
    for name in names:
        ms = statistics.median(times[name])
        row: dict[str, Any] = {"ms": ms, "per_round_ms": times[name], "speedup_vs_upstream": round(upstream_ms / ms, 3),
                               "peak_gib": peak[name]}
        if name != "upstream":
            row["rel_err_vs_upstream_autocast"] = {k: _rel(outputs[name][k], outputs["upstream"][k]) for k in OUTPUTS}
        result[name] = row
    result["this_over_other"] = round(result[names[1]]["ms"] / result[names[2]]["ms"], 4)
    log.info("%d frames: %s; this tree / other %.4f", frames,
             ", ".join(f"{n} {result[n]['ms']:.2f} ms" for n in names), result["this_over_other"])
    del models, outputs
    torch.cuda.empty_cache()
    return result


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ab_tree.py needs a CUDA GPU")
    other = load_other(args.other)
    started = datetime.datetime.now(datetime.timezone.utc)
    base = build_vggt("full", seed=0, enable_track=False).eval()
    results = []
    for frames in (int(f) for f in args.frames.split(",")):
        rounds, repeats = (2, 2) if frames >= args.large else (args.rounds, args.repeats)
        results.append(compare(base, other, args.preset, frames, rounds, repeats))
    meta = {**ab_meta(started, __doc__), "other_commit": args.other_commit or str(args.other),
            "preset": args.preset, "image_size": 518, "batch": 1}
    write_report(args.out, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
