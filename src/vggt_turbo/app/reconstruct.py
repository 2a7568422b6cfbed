"""``vggt-turbo reconstruct INPUT --out DIR``: images or a video in, cameras, depth and a point cloud out.

The user's main job. It runs upstream's own pipeline (``load_and_preprocess_images``, ``VGGT.forward``,
``pose_encoding_to_extri_intri``) on a model patched by ``apply_optimizations``, and writes, all at once or not
at all (see ``export.staged_directory``):

  predictions.npz   extrinsics (S,3,4) camera-from-world, intrinsics (S,3,3), depth (S,H,W,1), depth_conf (S,H,W),
                    world_points (S,H,W,3), world_points_conf (S,H,W), image_names, weights, random_weights
  points.ply        world points whose confidence is >= the --conf-percentile, coloured by the images (--export ply)
  images/           the preprocessed frames (the resolution the cameras describe)
  sparse/           COLMAP text model: cameras.txt (PINHOLE), images.txt, points3D.txt (depth-lifted points)
  sparse/0/         the same model in COLMAP's binary format, as gsplat and nerfstudio read it (--export colmap)
  transforms.json   nerfstudio's cameras, with its initial points in sparse_pc.ply (--export nerfstudio)
  preview.png       the point cloud and cameras from two viewpoints, frames and their depth maps
  report.json       timings per phase, peak memory, patches applied, versions, frames, weights

Problems the user can fix exit with code 2 and one line on stderr (``-v`` adds the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import apply_optimizations, describe
from ..config import PRESETS
from ..random_model import SMALL_IMAGE
from . import (example_scene, export, export_options, fit, inputs, kernel_cache, memory, preview_process, selection,
               warm_start, weights)
from .errors import UserError
from .export_colmap_binary import write_colmap_binary
from .export_nerfstudio import write_nerfstudio
from .frames_ahead import FramesAhead
from .inference import phases, predict
from .options import ReconstructOptions
from .report import RANDOM_WEIGHTS_NOTE, build_report, print_summary
from .result import Result
from .weights import DEFAULT_WEIGHTS

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIDENCES = ("world_points_conf", "depth_conf")  # thresholded at --conf-percentile: points.ply, the COLMAP model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reconstruct",
        help="reconstruct a scene (cameras, depth, point cloud) from a folder of images or a video",
        description="Reconstruct a scene from a folder of images or a video with upstream VGGT, made faster\n"
        "by vggt_turbo. Writes into --out, all at once or not at all:\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, nargs="?", help="folder of images (sorted by name) or a video file")
    p.add_argument("--example", action="store_true",
                   help=f"instead of INPUT, a room the package renders itself ({example_scene.VIEWS} views): runs "
                   "anywhere, offline with --random-weights")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be absent or empty unless --force)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="exact", help="vggt_turbo preset (default: exact)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--weights", help="Hugging Face id, or a local .pt/.pth/.safetensors file or save_pretrained "
                        f"folder (default: {DEFAULT_WEIGHTS})")
    source.add_argument("--random-weights", action="store_true", help="random weights: no download, MEANINGLESS results")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--frames", type=_frames, metavar="N",
                       help=f"use N evenly spaced frames (default: all images; {inputs.DEFAULT_VIDEO_FRAMES} of a video); "
                       "auto: as many as fit in the GPU's memory (see vggt-turbo plan)")
    count.add_argument("--stride", type=_positive_int, metavar="K", help="use every K-th frame")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--memory", type=float, metavar="GiB", default=fit.env_memory(),
                   help=f"plan for this much GPU memory instead of what is free (also ${fit.MEMORY_ENV})")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="autocast dtype (auto: bf16 on Ampere+ CUDA, fp16 on older CUDA, fp32 on the CPU)")
    p.add_argument("--mode", choices=("crop", "pad"), default="crop",
                   help="upstream preprocessing: 518 px wide and crop the height, or fit in 518x518 and pad")
    p.add_argument("--conf-percentile", type=_percentile, default=50.0, metavar="P",
                   help="points.ply keeps the points whose confidence is at or above this percentile (default: 50)")
    p.add_argument("--export", default=",".join(export_options.DEFAULT), metavar="LIST",
                   help=f"formats to write besides the npz, images/, COLMAP text, preview and report: a comma list "
                   f"of {', '.join(export_options.FORMATS)} (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="print errors only")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details, tracebacks on errors")
    # Test-only: upstream's classes at toy width (random_model.build_vggt("small")), images resized to 56x56.
    p.add_argument("--model-size", choices=("full", "small"), default="full", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The command: 0 on success, 2 with a one-line message for a problem the user can fix, 130 on Ctrl-C.

    Ctrl-C is the user's choice, not a failure: one line saying what is on disk (the staged output has been
    removed by then, see ``export.staged_directory``), no traceback unless ``-v``.
    """
    options = ReconstructOptions.from_args(args)
    with _quiet(options.quiet):
        try:
            with _example_input(options) as given:
                result = reconstruct(given)
        except UserError as exc:
            if options.verbose:
                traceback.print_exc()
            print(f"vggt-turbo reconstruct: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if options.verbose:
                traceback.print_exc()
            kept = "previous output kept" if options.out.exists() else "nothing written"
            print(f"\nvggt-turbo reconstruct: interrupted; {kept}", file=sys.stderr)
            return 130
    if not options.quiet:
        print_summary(result)
    return 0


@contextlib.contextmanager
def _example_input(options: ReconstructOptions) -> Iterator[ReconstructOptions]:
    """With ``--example``, the options with INPUT a folder of ``example_scene`` views rendered for this run (then
    deleted); otherwise the options as they are."""
    if options.example == (options.input is not None):
        raise UserError("give INPUT (a folder of images or a video) or --example, not both" if options.example
                        else "no INPUT: give a folder of images or a video, or --example for the built-in scene")
    if not options.example:
        yield options
        return
    with tempfile.TemporaryDirectory(prefix="vggt-turbo-example-") as workdir:
        yield dataclasses.replace(options, input=example_scene.write(Path(workdir) / example_scene.NAME))


def reconstruct(options: ReconstructOptions) -> Result:
    """Check, load, build, infer, export; each phase timed. Raises ``UserError`` for what the user can fix.

    Everything that can fail for a reason the user controls is checked before the model is built (the step
    that takes most of a minute on a CPU): the device, the output folder (writable, not the input), upstream
    being importable, the input, the dtype, the weights (a local checkpoint's names and shapes), and the memory.
    """
    formats = export_options.parse(options.export)
    device = _device(options.device)
    _check_out(options.out, options.input, options.force)
    _check_upstream()
    if device.type == "cuda":
        kernel_cache.use_own_caches()  # before the warm start imports Triton
    # Start-up costs while frames and weights load: CUDA and Triton on a thread, the preview's worker process.
    with preview_process.started(options.quiet) as previews, warm_start.running(device) as warm:
        return _run(options, formats, device, warm, previews)


def _run(options: ReconstructOptions, formats: tuple[str, ...], device: torch.device, warm: warm_start.WarmStart,
         previews: preview_process.PreviewProcess) -> Result:
    """Load, build, infer and export, each phase timed; the forward waits for ``warm`` first, the export draws
    the preview with ``previews``."""
    timings: dict[str, float] = {}

    start = time.perf_counter()
    if options.frames == "auto":
        options = dataclasses.replace(options, frames=fit.auto_frames(options, device))
    # The weights are checked (and the model's meta-device skeleton built) while the frames decode.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vggt-turbo-plan") as checking:
        planning = checking.submit(weights.plan, options.weights, options.random_weights, options.model_size)
        images, names, kind, available = _load(options)
        loaded_at = time.perf_counter()
        dtype = _dtype(options.dtype, device)  # initialises CUDA: the warm start's thread has been doing so meanwhile
        plan = planning.result()
    checks = time.perf_counter() - loaded_at  # what the weights' check took beyond the frames
    kind = "example scene" if options.example else kind
    # What the full model would see: the plan's arithmetic is for it, also in the test-only small-model path.
    planned = fit.plan_for(options, device, images.shape[0], images.shape[2], images.shape[3])
    offload = fit.decide(options, planned)
    if options.model_size == "small":  # test-only path: the toy model expects a 4x4 patch grid
        images = F.interpolate(images, size=(SMALL_IMAGE, SMALL_IMAGE), mode="bilinear", align_corners=False, antialias=True)
    frames, _, height, width = images.shape
    output_names = export.output_image_names(names)
    colors = export.images_to_uint8(images.numpy())
    timings["load"] = time.perf_counter() - start - checks
    with FramesAhead(colors, output_names) as frames_ahead:  # images/ encoded while the model loads and runs
        start = time.perf_counter()
        memory.reset_peak(device)
        if planned is None:  # the CPU without --memory: its RAM, by the rough estimate
            memory.check_fits(plan.skeleton, frames, height, width, device, dtype)
        # concurrent_heads (1 frame) does not run with offloading forced on: patches refuse the pair
        flags = {"offload_intermediates": True, "concurrent_heads": False} if offload else {}
        with _bar("model", 1, "model", options.quiet) as bar:
            bar.set_postfix_str(plan.source)
            loaded = plan.build(device)  # straight onto the device: no CPU initialisation, no copy of the weights
            # One forward per run: CUDA-graph capture (two warm-ups, then capture) would cost more than it saves.
            model = apply_optimizations(loaded.model, options.preset, cuda_graphs=False, **flags)
            applied = describe(model)
            _step(bar, f"{loaded.source} on {device}, preset {options.preset}")
        timings["model"] = checks + time.perf_counter() - start

        warm.wait()
        kernels = kernel_cache.configure(device, options.preset, dtype)
        start = time.perf_counter()
        with _bar("inference", len(phases(model)), "phase", options.quiet) as bar:
            if kernels.progress_note():
                bar.set_postfix_str(kernels.progress_note())
            try:
                predictions, inner, thresholds = predict(
                    model, images.to(device), dtype, lambda name: _step(bar, name),
                    {name: options.conf_percentile for name in CONFIDENCES})
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                error = fit.out_of_memory_error(exc, planned, options.preset,
                                                f"{device} with {frames} frames at {width}x{height}")
                if error is None:
                    raise
                raise error from exc
        timings["inference"] = time.perf_counter() - start
        if kernels.directory is not None:  # a first run pays the kernels' compilation; report.json tells them apart
            timings["inference_warm" if kernels.warm else "inference_first_run"] = timings["inference"]
        kernels.mark_warm()
        timings.update(inner)
        source = loaded.source
        del model, loaded, plan  # free the weights before export allocates the point cloud

        renamed = [(a, b) for a, b in zip(names, output_names) if a != b and f"{a}.png" != b]
        if renamed:
            shown = ", ".join(f"{a!r} -> {b!r}" for a, b in renamed[:3]) + (", ..." if len(renamed) > 3 else "")
            log.warning("%d file name(s) saved under names COLMAP's text format can read (%s); report.json and "
                        "predictions.npz keep the originals (input_names)", len(renamed), shown)
        result = Result(
            options=options, weights=source, frames=frames, frames_in_input=available, input_kind=kind,
            image_names=output_names, input_names=names, width=width, height=height, device=device,
            dtype=dtype, timings=timings, outputs=export_options.outputs(formats), kernels=kernels,
            optimizations={"config": applied.config.as_dict() if applied.config else None, "exact": applied.exact,
                           "tier": applied.tier.label, "patched": applied.targets},
        )
        _export(result, predictions, thresholds, colors, formats, frames_ahead, previews)
        return result


def _check_upstream() -> None:
    """Upstream VGGT must import (model, pose decoding) before anything else is done.

    Upstream's image loader is not imported: the frames go through ``inputs.preprocess`` (its steps, tested bit
    for bit against it), and importing it would import torchvision, whose ``ops`` import torch's compiler stack:
    seconds of a one-shot run for nothing."""
    try:
        for module in ("vggt.models.vggt", "vggt.utils.pose_enc"):
            importlib.import_module(module)
    except ImportError as exc:
        raise UserError(
            f"upstream VGGT is not installed or incomplete ({exc}): pip install --no-deps -r "
            "requirements-upstream.txt, or from a local checkout pip install --no-deps /path/to/vggt (see the "
            "README, Install)"
        ) from exc


def _export(result: Result, predictions: dict[str, np.ndarray], thresholds: dict[str, float], colors: np.ndarray,
            formats: tuple[str, ...], frames: FramesAhead, previews: preview_process.PreviewProcess) -> None:
    """Write every output into a staging folder that replaces ``--out`` only once all are written.

    The writers are independent of one another, so they run side by side on a thread per core (PNG and zlib
    encoding, file writes and much of numpy release the GIL); the frames of images/ were encoded while the model
    ran (``frames``), each is written as soon as it is ready; the preview is drawn by another process
    (``previews``). ``thresholds``: the ``--conf-percentile``-th percentile of each of ``CONFIDENCES``, found
    where the predictions were. What the writers share (the confident points, the COLMAP model) is computed on
    the pool too, the two side by side and beside predictions.npz, which needs neither; the COLMAP text, the
    longest writer left in this process, follows its model on the same thread; report.json, which counts what
    the others wrote, comes last. The first failure (or Ctrl-C) cancels what has not started and, through
    ``staged_directory``, leaves nothing behind.
    """
    options, names = result.options, result.image_names
    start = time.perf_counter()
    notes = [RANDOM_WEIGHTS_NOTE] if result.random_weights else []
    steps = len(names) + 4 + len(formats)  # each frame, predictions.npz, sparse/, preview.png, report.json, formats
    with _bar("export", steps, "step", options.quiet) as bar, export.staged_directory(options.out, options.force) as stage, \
            ThreadPoolExecutor(max_workers=inputs.workers(), thread_name_prefix="vggt-turbo-export") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="vggt-turbo-preview") as drawing:
        jobs: dict[Future[Any], str] = {}
        try:
            result.conf_threshold = thresholds["world_points_conf"]
            points = pool.submit(export.confident_points, predictions["world_points"],
                                 predictions["world_points_conf"], colors, result.conf_threshold)

            def colmap_text() -> export.ColmapModel:  # the longest writer in this process: started first
                model = export.colmap_model(
                    predictions["extrinsics"], predictions["intrinsics"], predictions["depth"],
                    predictions["depth_conf"], colors, names, result.width, result.height, thresholds["depth_conf"],
                )
                export.write_colmap(stage / "sparse", model, notes)
                return model

            colmap = pool.submit(colmap_text)
            jobs[colmap] = "sparse/"
            arrays = dict(predictions, image_names=np.array(names), input_names=np.array(result.input_names),
                          weights=np.array(result.weights),
                          random_weights=np.array(result.random_weights))
            jobs[pool.submit(export.write_npz, stage / "predictions.npz", arrays)] = "predictions.npz"

            xyz, rgb = points.result()
            result.points = len(xyz)
            # The preview, the longest job, drawn by another process (``previews``): a thread of its own hands it
            # over and waits, so that no writer's thread waits with it.
            jobs[drawing.submit(previews.render_preview, stage / "preview.png", xyz, rgb, predictions["extrinsics"],
                                predictions["intrinsics"], colors, predictions["depth"], names, notes)] = "preview.png"
            if "ply" in formats:
                ply = export.write_ply
                jobs[pool.submit(ply, stage / "points.ply", xyz, rgb, [*notes, f"weights: {result.weights}"])] = "points.ply"
            (stage / "images").mkdir()
            for index in range(len(names)):  # encoded already, or being encoded: written as each is ready
                jobs[pool.submit(frames.write, stage / "images", index)] = "images/"

            model = colmap.result()
            result.colmap_points, result.colmap_skipped = len(model.xyz), model.skipped
            if "colmap" in formats:
                jobs[pool.submit(write_colmap_binary, stage / "sparse" / "0", model)] = "sparse/0/"
            if "nerfstudio" in formats:
                jobs[pool.submit(write_nerfstudio, stage, model, notes)] = "transforms.json"
            for done in as_completed(jobs):
                done.result()
                _step(bar, jobs[done])
        except BaseException:
            for executor in (drawing, pool):  # nothing may still write once the stage is removed
                executor.shutdown(wait=True, cancel_futures=True)
            raise

        result.timings["export"] = time.perf_counter() - start
        result.peak_bytes, result.peak_measured = memory.peak(result.device)
        export.write_json(stage / "report.json", build_report(result))
        _step(bar, "report.json")


def _load(options: ReconstructOptions) -> tuple[torch.Tensor, list[str], str, int]:
    """(images (S, 3, H, W) as upstream's loader makes them, their names, "folder" or "video", frames in the input).

    One progress bar: a step per file checked or frame decoded (see ``inputs.load_folder``, ``load_frames``).
    """
    source: Path = options.input
    if not source.exists():
        raise UserError(f"input not found: {source}")
    if source.is_dir():
        files = inputs.list_images(source)
        _say_frames_used(options, len(files), "images in the folder")
        chosen = selection.select(len(files), options.frames, options.stride)
        with _bar("load", len(files), "file", options.quiet) as bar:
            images = inputs.load_folder(files, chosen, options.mode, lambda name: _step(bar, name))
        return images, [files[i].name for i in chosen], "folder", len(files)

    noise = inputs.DecoderNoise()
    count = inputs.video_frame_count(source, noise)
    _say_frames_used(options, count, "frames in the video's header")
    wanted = selection.select(count, options.frames or (None if options.stride else inputs.DEFAULT_VIDEO_FRAMES),
                              options.stride)
    with _bar("load", len(wanted), "frame", options.quiet) as bar:
        images, indices = inputs.load_frames(inputs.video_frames(source, wanted, noise), options.mode,
                                             lambda index: _step(bar, f"frame {index}"))
    names = [f"frame_{index:06d}.png" for index in indices]
    decoded = indices[-1] + 1 if indices else 0
    if len(names) < len(wanted) and noise.lines:
        raise UserError(
            f"{source}: the video is damaged: no frame asked for could be decoded after frame {decoded} of the "
            f"{count} its header "
            f"announces ({noise.summary()}); re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4) or extract "
            "the good frames into a folder"
        )
    if not names:
        raise UserError(f"{source}: no frame could be decoded")
    if len(names) < len(wanted):
        log.warning("%s: decoded %d of the %d frames asked for (the video is shorter than its header says)",
                    source, len(names), len(wanted))
    if noise.lines:
        log.warning("%s: %s; the frames used may show it", source, noise.summary())
    return images, names, "video", count


def _say_frames_used(options: ReconstructOptions, available: int, what: str) -> None:
    """``--frames N`` beyond what the input has uses all of it: say so (report.json and the summary do too)."""
    if options.frames is not None and options.frames > available:
        log.warning("--frames %d: there are only %d %s; using all %d", options.frames, available, what, available)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"--device cuda: CUDA is not available ({why}, torch {torch.__version__}); use --device cpu")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    cuda = device.type == "cuda"
    if name == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use --dtype fp16")
    return DTYPES[name]


def _check_out(out: Path, source: Path, force: bool) -> None:
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise UserError(f"--out {out} is or contains the input {source}: choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not empty; pass --force to replace it")
    export.check_writable(out)


def _bar(desc: str, total: int, unit: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=f"{desc:<9}", unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True)


def _step(bar: tqdm, name: str) -> None:
    bar.set_postfix_str(name, refresh=False)
    bar.update()


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """With ``--quiet``, silence log records below ERROR, Python warnings and Hugging Face's download bars for
    the duration of the run."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    with warnings.catch_warnings():
        # Upstream's forward uses the deprecated torch.cuda.amp.autocast on every call; not the user's to fix.
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast", category=FutureWarning)
        if not quiet:
            yield
            return
        hub_bars_were_off = are_progress_bars_disabled()
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        disable_progress_bars()
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
            if not hub_bars_were_off:
                enable_progress_bars()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _frames(text: str) -> Any:
    return "auto" if text == "auto" else _positive_int(text)


def _percentile(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 100, got {text!r}") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {text}")
    return value
