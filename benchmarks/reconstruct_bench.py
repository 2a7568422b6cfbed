"""Time the whole ``vggt-turbo reconstruct`` command per phase against upstream's own pipeline (issue #20 item 5).

What a user waits for: each run is a fresh process on a folder of N frames (cycled from ``--images``, default the
package's rendered example room), a local safetensors checkpoint of random weights (made once, ``--checkpoint``),
timed from the command's start to its end. Two pipelines, both on ``--device``:

  turbo     ``vggt-turbo reconstruct FOLDER --weights CKPT --preset P``; its phases from report.json; run
            ``--runs`` times in a row, so the first run (kernels compiled) and warm runs are both recorded.
  upstream  what upstream's demo does: ``load_and_preprocess_images``, ``VGGT()`` then ``load_state_dict`` of
            the checkpoint, ``.to(device)``, one forward under autocast, ``pose_encoding_to_extri_intri``, the
            predictions saved with ``np.savez``.

``--compare-src`` runs the command from another tree's ``src/`` right after each of this tree's runs, on the same
folder: two commits side by side on one host, where hosts differ more than the change.

Also recorded: the time to read the checkpoint file (the floor of the model phase) and the goal of the issue,
whole command <= 2 x forward + read. ``--size small`` (the toy model, 56 px) runs anywhere, for a smoke test.

    python benchmarks/reconstruct_bench.py --frames 10,28,100 --images /path/to/images --checkpoint /tmp/vggt.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

log = logging.getLogger("reconstruct_bench")
ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="10,28,100", help="comma list of frame counts (default: %(default)s)")
    p.add_argument("--images", type=Path, help="folder of images to cycle through (default: the example room)")
    p.add_argument("--checkpoint", type=Path, help="safetensors checkpoint (made from random weights if absent)")
    p.add_argument("--size", choices=("full", "small"), default="full")
    p.add_argument("--preset", default="exact")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--runs", type=int, default=2, help="turbo runs per frame count (first, then warm)")
    p.add_argument("--skip-upstream", action="store_true")
    p.add_argument("--compare-src", type=Path, metavar="DIR",
                   help="also run the command from another tree's src/ (e.g. git archive OLD src | tar -x -C /tmp/old),"
                   " each run right after this tree's: an A/B of two commits on one host")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reconstruct")
    p.add_argument("--upstream-child", nargs=4, metavar=("FOLDER", "CKPT", "DEVICE", "SIZE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _env(src: Path = ROOT / "src") -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def frames_folder(source: list[Path], count: int, workdir: Path) -> Path:
    """A folder of ``count`` frames: links to ``source`` cycled, named in order."""
    folder = workdir / f"frames-{count}"
    folder.mkdir()
    for i in range(count):
        src = source[i % len(source)]
        (folder / f"{i:05d}{src.suffix.lower()}").symlink_to(src.resolve())
    return folder


def source_images(images: Optional[Path], workdir: Path) -> list[Path]:
    if images is None:
        from vggt_turbo.app import example_scene

        images = example_scene.write(workdir / "example-room")
    found = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise SystemExit(f"no images in {images}")
    return found


def ensure_checkpoint(path: Optional[Path], size: str, workdir: Path) -> Path:
    """The checkpoint both pipelines load: ``path`` if it exists, else random weights saved there (or in workdir)."""
    path = path or workdir / f"vggt-{size}-random.safetensors"
    if path.exists():
        return path
    from safetensors.torch import save_file

    from vggt_turbo.random_model import build_vggt

    log.info("writing a %s checkpoint of random weights to %s", size, path)
    model = build_vggt(size, enable_track=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def read_seconds(path: Path) -> float:
    """Seconds to read the file once, in 64 MiB chunks (from the page cache if it is there: say so in results)."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    return time.perf_counter() - start


def run_turbo(folder: Path, ckpt: Path, args: argparse.Namespace, out: Path, src: Path = ROOT / "src") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "vggt_turbo.cli", "reconstruct", str(folder), "--out", str(out), "--force", "--quiet",
           "--weights", str(ckpt), "--preset", args.preset, "--device", args.device, "--export", "ply"]
    if args.size == "small":
        cmd += ["--model-size", "small"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=_env(src), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"reconstruct failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "phases_s": report["timings_s"], "kernel_cache": report.get("kernel_cache"),
            "vggt_turbo": report["versions"]["vggt_turbo"]}


def run_upstream(folder: Path, ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--upstream-child", str(folder), str(ckpt), args.device, args.size]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"upstream pipeline failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"wall_s": wall, "phases_s": json.loads(done.stdout.strip().splitlines()[-1])}


def upstream_child(folder: str, ckpt: str, device_name: str, size: str) -> dict[str, float]:
    """Upstream's own pipeline, phase by phase (printed as one JSON line by the child process)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from vggt_turbo.app.inputs import upstream_loader
    from vggt_turbo.random_model import SMALL_IMAGE, build_vggt

    device = resolve_device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    paths = sorted(str(p) for p in Path(folder).iterdir())
    images = upstream_loader()(paths, mode="crop")
    if size == "small":
        images = F.interpolate(images, size=(SMALL_IMAGE, SMALL_IMAGE), mode="bilinear", align_corners=False, antialias=True)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    if size == "full":
        from vggt.models.vggt import VGGT

        model = VGGT(enable_track=False)
    else:
        model = build_vggt("small", enable_track=False, randomize=False)
    model.load_state_dict(load_file(ckpt))
    model = model.to(device).eval()
    sync()
    timings["model"] = time.perf_counter() - start

    from vggt.utils.pose_enc import pose_encoding_to_extri_intri

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else (
        torch.float16 if device.type == "cuda" else torch.float32)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(images.to(device))
    extrinsics, intrinsics = pose_encoding_to_extri_intri(out["pose_enc"], images.shape[-2:])
    predictions = {k: v[0].float().cpu().numpy() for k, v in
                   {**out, "extrinsics": extrinsics, "intrinsics": intrinsics}.items() if torch.is_tensor(v)}
    timings["inference"] = time.perf_counter() - start

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "predictions.npz", "wb") as f:
        np.savez(f, **predictions)
    timings["export"] = time.perf_counter() - start
    return timings


def resolve_device(device: str) -> torch.device:
    """``--device``: "auto" is CUDA where there is one, else the CPU."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def device_slug(device: str) -> str:
    import torch

    dev = resolve_device(device)
    return torch.cuda.get_device_name(dev).lower().replace(" ", "-") if dev.type == "cuda" else "cpu"


def run_meta(device: str) -> dict[str, Any]:
    """What the numbers hold for: the GPU (or CPU), torch, upstream's and this tree's commits, the date."""
    import datetime

    import torch

    from vggt_turbo.bench.meta import turbo_commit, upstream_commit

    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    # Python's own startup is part of what a user waits for: a pip install leaves compiled bytecode; a machine with
    # PYTHONDONTWRITEBYTECODE and none compiles every module it imports on every run (seconds for torch).
    bytecode = ("not written (PYTHONDONTWRITEBYTECODE)" if sys.flags.dont_write_bytecode
                else "cached" + (f" under {sys.pycache_prefix}" if sys.pycache_prefix else ""))
    return {"gpu": name, "torch": torch.__version__, "upstream_commit": upstream_commit()[0],
            "vggt_turbo_commit": turbo_commit(), "date": datetime.date.today().isoformat(), "argv": sys.argv[1:],
            "python_bytecode": bytecode}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.upstream_child:
        print(json.dumps(upstream_child(*args.upstream_child)))
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = [int(x) for x in args.frames.split(",")]
    results: dict[str, Any] = {"meta": run_meta(args.device), "device": device_slug(args.device), "size": args.size,
                               "preset": args.preset, "host": platform.node(), "cpus": os.cpu_count(), "rows": [],
                               **({"compare_src": str(args.compare_src)} if args.compare_src else {})}
    with tempfile.TemporaryDirectory(prefix="reconstruct-bench-") as tmp:
        workdir = Path(tmp)
        source = source_images(args.images, workdir)
        ckpt = ensure_checkpoint(args.checkpoint, args.size, workdir)
        results["checkpoint_bytes"] = ckpt.stat().st_size
        results["checkpoint_read_s"] = read_seconds(ckpt)  # after ensure_checkpoint: usually from the page cache
        for count in counts:
            folder = frames_folder(source, count, workdir)
            row: dict[str, Any] = {"frames": count, "turbo": [], **({"compare": []} if args.compare_src else {})}
            for run in range(args.runs):
                row["turbo"].append(run_turbo(folder, ckpt, args, workdir / f"out-{count}-{run}"))
                log.info("%d frames, turbo run %d: %.2f s %s", count, run + 1, row["turbo"][-1]["wall_s"],
                         row["turbo"][-1]["phases_s"])
                if args.compare_src:
                    row["compare"].append(run_turbo(folder, ckpt, args, workdir / f"cmp-{count}-{run}", args.compare_src))
                    log.info("%d frames, compared tree run %d: %.2f s %s", count, run + 1,
                             row["compare"][-1]["wall_s"], row["compare"][-1]["phases_s"])
            if not args.skip_upstream:
                row["upstream"] = run_upstream(folder, ckpt, args)
                log.info("%d frames, upstream: %.2f s %s", count, row["upstream"]["wall_s"], row["upstream"]["phases_s"])
            warm = row["turbo"][-1]
            forward = warm["phases_s"]["aggregator"] + warm["phases_s"]["heads"]
            row["goal_s"] = 2 * forward + results["checkpoint_read_s"]  # issue #20: whole command within this
            row["goal_met"] = warm["wall_s"] <= row["goal_s"]
            results["rows"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{results['device']}-{args.size}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    log.info("%s", table(results))
    log.info("wrote %s", path)
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| frames | pipeline | whole command s | load | model | inference | export | goal (2 x fwd + read) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        runs = [(f"turbo run {i + 1}", r) for i, r in enumerate(row["turbo"])]
        runs += [(f"compared tree run {i + 1}", r) for i, r in enumerate(row.get("compare", []))]
        runs += [("upstream", row["upstream"])] if "upstream" in row else []
        for name, r in runs:
            t = r["phases_s"]
            goal = f"{row['goal_s']:.2f} ({'met' if row['goal_met'] else 'not met'})" if name.startswith("turbo") else ""
            lines.append(f"| {row['frames']} | {name} | {r['wall_s']:.2f} | {t['load']:.2f} | {t['model']:.2f} | "
                         f"{t['inference']:.2f} | {t['export']:.2f} | {goal} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
