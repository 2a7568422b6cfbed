"""``vggt-turbo bench --precision``: every variant's error against upstream in fp32, the precision contract.

The yardstick is upstream run in fp32 (no autocast, TF32 off). Upstream's own recommended bf16 autocast already
differs from it; that difference is the noise floor. A variant of the exact tier keeps the contract when every
output (pose_enc, depth, depth_conf, world_points, world_points_conf, and with query points track, vis, conf)
and the largest camera rotation angle stay within ``CONTRACT`` (1.25x) of upstream-autocast's own error against
fp32. Reduced-precision and approximate variants are measured the same way and published, not held to it.

Variants (``precision_variants``): ``upstream`` (bf16 autocast, the floor), ``exact``, every exact-tier flag alone,
``exact+bf16_weights`` (the reduced-precision flag on top of exact) and ``fast``. All run in one process on the same
weights and inputs; the variants under bf16 autocast with torch's default TF32 settings, as a user runs them.

Inputs: upstream's example images through upstream's ``load_and_preprocess_images`` (non-square: 518 x 392 for the
4:3 scenes), cycled when a sequence is longer than the scenes; without examples, seeded random images of that
size (the metadata says which). Batch 2 takes the next frames of the cycle as its second sequence.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..config import PRESETS, TurboConfig
from .fidelity import fp32_reference_mode, fresh_upstream_caches, pose_rotation_errors_deg, relative_error
from ..patches import Tier
from ..patching import apply_optimizations, revert_optimizations
from .variants import flag_variants

log = logging.getLogger(__name__)

CONTRACT = 1.25
OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
TRACK_OUTPUTS = ("track", "vis", "conf")
ROTATION = "rotation_deg"
UPSTREAM = "upstream"
TRACK_POINTS = 64


@dataclass(frozen=True)
class PrecisionVariant:
    name: str
    config: Optional[TurboConfig]  # None: upstream under bf16 autocast

    @property
    def tier(self) -> Optional[Tier]:
        return None if self.config is None else self.config.tier


def precision_variants() -> list[PrecisionVariant]:
    """upstream, exact, every exact-tier flag alone, exact+bf16_weights and fast (see the module docstring)."""
    alone = [PrecisionVariant(v.name, v.config) for v in flag_variants() if v.config.tier is Tier.EXACT]
    return [
        PrecisionVariant(UPSTREAM, None),
        PrecisionVariant("exact", PRESETS["exact"]),
        *alone,
        PrecisionVariant("exact+bf16_weights", PRESETS["exact"].replace(bf16_weights=True)),
        PrecisionVariant("fast", PRESETS["fast"]),
    ]


def _outputs(model: nn.Module, images: torch.Tensor, query_points: Optional[torch.Tensor], autocast: bool,
             config: Optional[TurboConfig]) -> dict[str, torch.Tensor]:
    keys = OUTPUTS + (TRACK_OUTPUTS if query_points is not None else ())
    fresh_upstream_caches(model)  # each variant makes its RoPE tables as in a fresh process
    if config is not None:
        apply_optimizations(model, config)
    try:
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(images, query_points=query_points)
            if config is not None and config.cuda_graphs and images.is_cuda:
                out = model(images, query_points=query_points)  # the replay, not only the capture's eager calls
        return {k: out[k].float().cpu() for k in keys}
    finally:
        if config is not None:
            revert_optimizations(model)


def errors_against(pred: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error ``||a-b||/||b||`` per output, and the largest camera rotation angle (degrees) between them."""
    errs = {k: relative_error(pred[k], ref[k]) for k in ref}
    errs[ROTATION] = float(pose_rotation_errors_deg(pred["pose_enc"], ref["pose_enc"]).max())
    return errs


def ratios(errs: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    """Each error over upstream-autocast's (0 over 0 is 1: both exact; x over 0 is inf)."""
    return {k: (1.0 if e == 0 else math.inf) if floor[k] == 0 else e / floor[k] for k, e in errs.items()}


def measure(model: nn.Module, images: torch.Tensor, variants: Sequence[PrecisionVariant],
            query_points: Optional[torch.Tensor] = None, inputs: str = "examples") -> list[dict[str, Any]]:
    """One row per variant for one input batch (B, S, 3, H, W) against upstream in fp32."""
    with fp32_reference_mode():
        reference = _outputs(model, images, query_points, autocast=False, config=None)
    rows, floor = [], None
    for variant in variants:
        errs = errors_against(_outputs(model, images, query_points, autocast=True, config=variant.config), reference)
        if variant.config is None:
            floor = errs
        row: dict[str, Any] = {
            "variant": variant.name,
            "tier": variant.tier.label if variant.tier is not None else "upstream bf16 autocast",
            "frames": images.shape[1],
            "batch": images.shape[0],
            "image_hw": list(images.shape[-2:]),
            "inputs": inputs,
            "tracks": query_points is not None,
            "errors_vs_fp32": {k: v for k, v in errs.items() if k != ROTATION},
            "rot_deg_vs_fp32": errs[ROTATION],
        }
        if floor is not None and variant.config is not None:
            r = ratios(errs, floor)
            row["ratio_vs_upstream_autocast"] = r
            row["worst_ratio"] = max(r.values())
            row["within_contract"] = row["worst_ratio"] <= CONTRACT
        log.info("%s", _line(row))
        rows.append(row)
    return rows


def example_images(root: Optional[Path], frames: int, batch: int, device: torch.device,
                   size_hw: tuple[int, int] = (392, 518)) -> tuple[torch.Tensor, str]:
    """(batch, frames, 3, H, W): the example scenes' images cycled, or seeded random images of ``size_hw``."""
    paths = sorted(p for p in root.glob("*/images/*") if p.is_file()) if root is not None else []
    if not paths:
        g = torch.Generator().manual_seed(1000 * batch + frames)
        return torch.rand(batch, frames, 3, *size_hw, generator=g).to(device), "random"
    from vggt.utils.load_fn import load_and_preprocess_images

    picked = [str(paths[i % len(paths)]) for i in range(batch * frames)]
    images = load_and_preprocess_images(picked)
    return images.reshape(batch, frames, *images.shape[1:]).to(device), "examples"


def query_points_for(images: torch.Tensor, count: int = TRACK_POINTS) -> torch.Tensor:
    """(B, count, 2) seeded pixel coordinates inside the images."""
    g = torch.Generator().manual_seed(count)
    hw = torch.tensor([images.shape[-1] - 1, images.shape[-2] - 1], dtype=torch.float32)
    return (torch.rand(images.shape[0], count, 2, generator=g) * hw).to(images.device)


# --- report -----------------------------------------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value:.2e}" if value < 0.1 or value >= 1000 else f"{value:.3g}"


def _line(row: dict[str, Any]) -> str:
    errs = " ".join(f"{k} {_fmt(v)}" for k, v in row["errors_vs_fp32"].items())
    verdict = "" if "within_contract" not in row else f" worst {row['worst_ratio']:.2f}x " + (
        "ok" if row["within_contract"] else "OUT")
    return (f"[{row['frames']} fr x B{row['batch']}{' +tracks' if row['tracks'] else ''}] {row['variant']:<22} "
            f"{errs} rot {row['rot_deg_vs_fp32']:.3f}°{verdict}")


def markdown(data: dict[str, Any]) -> str:
    """precision.md: one table per (frames, batch, tracks), then the contract's verdict per exact-tier variant."""
    meta = data["meta"]
    lines = [
        "# Precision against upstream in fp32",
        "",
        f"{meta['gpu']}, torch {meta['torch']}, upstream {meta['upstream_commit'][:8]}, vggt-turbo "
        f"{meta['vggt_turbo_commit']}, {meta['date']}. {meta['weights']}. Inputs: {meta['inputs']}.",
        "",
        f"Reference: {meta['reference']}. Every variant under {meta['autocast']}. Cells: ‖a−b‖/‖b‖ per output "
        "against the reference; `rot°`: the largest camera rotation angle between the two; `worst`: the largest "
        f"ratio of a cell to upstream-autocast's cell in the same table. Contract (exact tier): worst ≤ {CONTRACT}.",
        "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in data["rows"]:
        groups.setdefault((row["frames"], row["batch"], row["tracks"]), []).append(row)
    for (frames, batch, tracks), rows in sorted(groups.items()):
        keys = list(rows[0]["errors_vs_fp32"])
        lines += [f"## {frames} frame{'s' if frames > 1 else ''}, batch {batch}{', with query points' if tracks else ''}",
                  "", "| variant | tier | " + " | ".join(keys) + " | rot° | worst | contract |",
                  "|---|---|" + "---:|" * (len(keys) + 2) + "---|"]
        for row in rows:
            cells = [_fmt(row["errors_vs_fp32"][k]) for k in keys] + [f"{row['rot_deg_vs_fp32']:.3f}"]
            worst = f"{row['worst_ratio']:.2f}×" if "worst_ratio" in row else "1 (floor)"
            verdict = "" if row["tier"] != "exact" else ("ok" if row.get("within_contract") else "**out**")
            lines.append(f"| {row['variant']} | {row['tier']} | " + " | ".join(cells) + f" | {worst} | {verdict} |")
        lines.append("")
    exact_rows = [r for r in data["rows"] if r["tier"] == "exact"]
    out = sorted({r["variant"] for r in exact_rows if not r.get("within_contract")})
    lines.append(f"**Exact-tier variants outside the contract in any table:** {', '.join(out) if out else 'none'}.")
    return "\n".join(lines) + "\n"


# --- command ----------------------------------------------------------------------------------------------------

CUDA_FRAMES = (1, 10, 32)
CPU_FRAMES = (1, 2)
BATCHES = (1, 2)
TRACK_FRAMES = 10


def run_precision(model: nn.Module, device: torch.device, frames: Sequence[int], batches: Sequence[int],
                  examples: Optional[Path], variants: Optional[Sequence[PrecisionVariant]] = None,
                  size_hw: tuple[int, int] = (392, 518)) -> tuple[list[dict[str, Any]], str]:
    """Every (frames, batch) table, plus one with query points (the track head's outputs) at ``TRACK_FRAMES``
    frames (or the largest count asked below it), batch 1, when the model has a track head."""
    variants = list(variants or precision_variants())
    rows, kinds = [], set()
    for n in frames:
        for b in batches:
            images, kind = example_images(examples, n, b, device, size_hw)
            kinds.add(kind)
            rows += measure(model, images, variants, inputs=kind)
    if getattr(model, "track_head", None) is not None and frames:
        n = max([f for f in frames if f <= TRACK_FRAMES] or [min(frames)])
        images, kind = example_images(examples, n, 1, device, size_hw)
        track_variants = [v for v in variants if v.name in (UPSTREAM, "exact", "exact+bf16_weights", "fast")]
        rows += measure(model, images, track_variants, query_points_for(images), inputs=kind)
    return rows, " and ".join(sorted(kinds))
