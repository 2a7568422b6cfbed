#!/usr/bin/env python
"""One flag's effect, measured in one process: ``exact`` against ``exact`` without the flag, interleaved.

    python benchmarks/ab_flag.py --flag concurrent_heads --frames 1 --out /tmp/ab.json

Why: ``vggt-turbo bench`` times its variants one after another on one model (reverted in between), not
interleaved; at 1 frame their times drift by 1–2 ms between variants, as much as some flags save. Here two
copies of the same full model (random weights, seed 0), one patched with ``exact`` and one
with ``exact`` minus ``--flag`` (and minus the flags that need it, ``patches.switched_off``), run in one process on the same input, their timings interleaved round by round
(``--rounds`` rounds; per round the median of ``--repeats`` calls between CUDA events), so that clock and host
drift hit both alike. Reported per copy: the call, the CUDA graph's replay alone (where ``cuda_graphs`` captured
one: up to ``cuda_graph_max_frames`` frames), the kernels of one replay or call (torch.profiler: count, summed
duration and span; overlapping kernels make the sum exceed the span), memory reserved, and the two copies'
outputs compared (``torch.equal`` and ``||a-b||/||b||``). Needs a CUDA GPU and about twice the model's memory.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import vggt_turbo
from vggt_turbo.bench.meta import turbo_commit, upstream_commit
from vggt_turbo.config import TurboConfig
from vggt_turbo.patches import switched_off
from vggt_turbo.patches.runtime.cuda_graphs import graph_cache
from vggt_turbo.random_model import build_vggt, random_images

log = logging.getLogger("ab_flag")


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flag", required=True, help="a boolean TurboConfig flag that exact has on")
    p.add_argument("--frames", default="1", help="frame counts, comma-separated (default %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default %(default)s)")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per copy and round (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    exact = vggt_turbo.TurboConfig.preset("exact")
    if getattr(exact, args.flag, None) is not True:
        p.error(f"--flag must be a boolean flag that the exact preset has on, got {args.flag!r}")
    return args


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _kernels(fn: Callable[[], Any]) -> dict[str, Any]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e for e in json.loads(path.read_text())["traceEvents"]
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not events:
        return {"count": 0}
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    return {"count": len(events), "sum_ms": round(sum(e["dur"] for e in events) / 1e3, 3), "span_ms": round(span / 1e3, 3)}


def forward_call(model: nn.Module, images: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(images)

    return call


def compare(base: nn.Module, flag: str, frames: int, rounds: int, repeats: int) -> dict[str, Any]:
    images = random_images(frames, 518, seed=0).cuda()
    names = ("exact", f"exact-{flag}")
    models = {name: copy.deepcopy(base).cuda() for name in names}
    vggt_turbo.apply_optimizations(models[names[0]], "exact")
    vggt_turbo.apply_optimizations(models[names[1]], switched_off(TurboConfig.preset("exact"), flag))
    calls = {name: forward_call(model, images) for name, model in models.items()}
    outputs, reserved = {}, {}
    for name, call in calls.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_reserved()
        for _ in range(3):
            outputs[name] = call()
        reserved[name] = round((torch.cuda.max_memory_reserved() - start) / 2**30, 3)
    timings: dict[str, dict[str, list[float]]] = {name: {"call_ms": [], "replay_ms": []} for name in names}
    for _ in range(rounds):
        for name, model in models.items():
            timings[name]["call_ms"].append(round(median_ms(calls[name], repeats), 3))
            cache = graph_cache(model)
            if cache is not None and cache.entries:
                graph = next(iter(cache.entries.values())).graph
                if graph is not None:
                    timings[name]["replay_ms"].append(round(median_ms(graph.replay, repeats), 3))
    result: dict[str, Any] = {"frames": frames}
    for name, model in models.items():
        cache = graph_cache(model)
        entry = next(iter(cache.entries.values()), None) if cache is not None else None
        profiled = entry.graph.replay if entry is not None and entry.graph is not None else calls[name]
        result[name] = {
            **{key: statistics.median(values) for key, values in timings[name].items() if values},
            "per_round": timings[name],
            "kernels": {"of": "replay" if profiled is not calls[name] else "call", **_kernels(profiled)},
            "reserved_gib": reserved[name],
        }
    with_flag, without = outputs[names[0]], outputs[names[1]]
    keys = [k for k, v in without.items() if isinstance(v, torch.Tensor) and k != "images"]
    result["bitwise"] = {k: bool(torch.equal(with_flag[k], without[k])) for k in keys}
    result["rel_err"] = {k: float((with_flag[k].float() - without[k].float()).norm() / without[k].float().norm()) for k in keys}
    log.info("%d frames: %s", frames, {n: {k: result[n].get(k) for k in ("call_ms", "replay_ms")} for n in names})
    del models
    torch.cuda.empty_cache()
    return result


def ab_meta(started: datetime.datetime, doc: str) -> dict[str, Any]:
    """What every one-process A/B report records: the GPU, torch, upstream's and this tree's commits, the start
    time and the method (``doc``'s third paragraph)."""
    commit, source = upstream_commit()
    return {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "upstream_commit": commit,
        "upstream_commit_source": source, "vggt_turbo_commit": turbo_commit(),
        "time_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "what": doc.split("\n\n")[2].replace("\n", " "),
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    log.info("wrote %s", path)


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ab_flag.py needs a CUDA GPU")
    started = datetime.datetime.now(datetime.timezone.utc)
    base = build_vggt("full", seed=0, enable_track=False).eval()
    results = [compare(base, args.flag, int(f), args.rounds, args.repeats) for f in args.frames.split(",")]
    meta = {**ab_meta(started, __doc__), "flag": args.flag, "rounds": args.rounds, "repeats": args.repeats}
    write_report(args.out, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
