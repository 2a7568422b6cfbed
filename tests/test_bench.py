"""The benchmark harness (``vggt-turbo bench``) and the profiler script, on the CPU with the small model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vggt_turbo import TurboConfig
from vggt_turbo.bench import main
from vggt_turbo.bench.meta import image_size_label, parse_image_size
from vggt_turbo.bench.report import report_main
from vggt_turbo.bench.sweep import Budget
from vggt_turbo.bench.variants import DISTRIBUTED_FIELDS, MODIFIER_FIELDS, flag_variants, select_variants
from vggt_turbo.config import AUTO_FLAGS, PRESETS
from vggt_turbo.patches import flag_requirements

ROOT = Path(__file__).resolve().parents[1]
META_KEYS = {"gpu", "torch", "cuda", "upstream_commit", "vggt_turbo_commit", "date"}
ROW_KEYS = {"variant", "frames", "part", "seconds", "peak_gib", "speedup_vs_upstream", "max_rel_err_vs_upstream"}
VARIANTS = "upstream,sdpa,exact,fast"


def bench(out: Path, *extra: str) -> int:
    return main(["--device", "cpu", "--size", "small", "--repeats", "1", "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small sweep: 1 and 2 frames, four variants, phases at 2 frames; its results folder."""
    out = tmp_path_factory.mktemp("bench")
    assert bench(out, "--frames", "1,2", "--variants", VARIANTS, "--phases", "2") == 0
    return out / "cpu"


def load(folder: Path) -> dict:
    return json.loads((folder / "latest.json").read_text())


def test_schema(sweep: Path) -> None:
    data = load(sweep)
    assert META_KEYS <= data["meta"].keys()
    assert data["meta"]["gpu"] == "cpu" and data["meta"]["size"] == "small"
    rows = data["rows"]
    assert {(r["variant"], r["frames"], r["part"]) for r in rows} == {
        (v, f, p) for v in VARIANTS.split(",") for f in (1, 2) for p in ("full", "aggregator")
    }
    for r in rows:
        assert ROW_KEYS <= r.keys(), r
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["peak_gib"] is None  # no memory statistics on the CPU
        assert r["speedup_vs_upstream"] > 0
        assert set(r["errors"]) == ({"pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"}
                                    if r["part"] == "full" else {"tokens_last"})
        assert r["max_rel_err_vs_upstream"] == max(r["errors"].values())
        # the cameras' rotation error in degrees, beside the relative errors: full rows only (they have pose_enc)
        assert (r["pose_rot_err_deg"] >= 0) if r["part"] == "full" else (r["pose_rot_err_deg"] is None), r
        if r["variant"] == "upstream":
            assert r["speedup_vs_upstream"] == 1.0 and r["max_rel_err_vs_upstream"] == 0.0
            assert r["pose_rot_err_deg"] == (0.0 if r["part"] == "full" else None)


@pytest.mark.parametrize("text, hw", [("518", (518, 518)), ("518x392", (392, 518)), ("518X392", (392, 518)),
                                      (" 70 x 56 ", (56, 70)), ("518×392", (392, 518))])
def test_image_size_is_a_side_or_width_by_height(text: str, hw: tuple[int, int]) -> None:
    assert parse_image_size(text) == hw
    assert image_size_label(hw) == (hw[0] if hw[0] == hw[1] else f"{hw[1]}x{hw[0]}")


@pytest.mark.parametrize("text", ["", "518x", "x392", "518x392x3", "abc", "0", "500", "518x400", "-518"])
def test_image_size_refuses_what_is_not_a_patch_grid(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_image_size(text)


def test_non_square_frames(tmp_path: Path) -> None:
    """``--image-size WxH`` runs frames of H rows and W columns, and says so in the meta and the report."""
    assert bench(tmp_path, "--frames", "2", "--variants", "upstream,exact", "--image-size", "70x56",
                 "--phases", "off") == 0
    data = load(tmp_path / "cpu")
    assert data["meta"]["image_size"] == "70x56" and data["meta"]["image_hw"] == [56, 70]
    assert {(r["variant"], r["part"]) for r in data["rows"]} == {
        (v, p) for v in ("upstream", "exact") for p in ("full", "aggregator")}
    assert all("error" not in r for r in data["rows"])
    assert "images 70×56" in (tmp_path / "cpu" / "latest.md").read_text()


def test_no_reference_skips_the_errors(tmp_path: Path) -> None:
    """``--no-reference``: timed rows without the fp32 call, so without errors (not zeros)."""
    assert bench(tmp_path, "--frames", "1", "--variants", "upstream,exact", "--phases", "off", "--no-reference") == 0
    rows = load(tmp_path / "cpu")["rows"]
    assert {r["variant"] for r in rows} == {"upstream", "exact"} and all(r["seconds"] > 0 for r in rows)
    assert all(r["errors"] is None and r["max_rel_err_vs_upstream"] is None and r["pose_rot_err_deg"] is None
               for r in rows)


def test_errors(sweep: Path) -> None:
    for r in load(sweep)["rows"]:
        if r["exact"]:
            assert r["max_rel_err_vs_upstream"] < 1e-5, r
            assert r["part"] != "full" or r["pose_rot_err_deg"] < 1e-3, r
        elif r["frames"] >= 2:
            assert r["max_rel_err_vs_upstream"] > 0, r  # fast: its approximations change the outputs
            assert r["part"] != "full" or r["pose_rot_err_deg"] > 1e-3, r
    assert {r["variant"] for r in load(sweep)["rows"] if not r["exact"]} == {"fast"}


def test_phases(sweep: Path) -> None:
    phases = load(sweep)["phases"]
    assert {p["variant"] for p in phases} == {"upstream", "exact", "fast"}
    for variant in ("upstream", "exact", "fast"):
        got = {p["phase"]: p for p in phases if p["variant"] == variant and p["frames"] == 2}
        assert {"patch_embed", "frame_blocks", "global_blocks", "camera_head", "depth_head", "point_head", "total"} <= got.keys()
        # hooks on blocks fire on patched models too: every block of the 24 + 24 is seen
        assert got["frame_blocks"]["calls"] == 24 and got["global_blocks"]["calls"] == 24
        assert sum(p["seconds"] for name, p in got.items() if name != "total") == pytest.approx(got["total"]["seconds"], rel=0.05, abs=1e-4)


def test_report_files(sweep: Path) -> None:
    data = load(sweep)
    assert (sweep / f"{data['meta']['date']}.json").read_text() == (sweep / "latest.json").read_text()
    md = (sweep / "latest.md").read_text()
    assert "| fast * |" in md and "Phase split at 2 frames" in md
    for name in ("latency.png", "memory.png", "phases.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_regenerates(sweep: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "latest.json").write_text((sweep / "latest.json").read_text())
    assert report_main([str(folder / "latest.json")]) == 0
    assert {"latest.md", "latency.png", "memory.png", "phases.png"} <= {p.name for p in folder.iterdir()}


def test_merge(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    (out / "cpu").mkdir(parents=True)
    (out / "cpu" / "latest.json").write_text((sweep / "latest.json").read_text())
    before = {(r["variant"], r["frames"], r["part"]): r for r in load(out / "cpu")["rows"]}
    assert bench(out, "--merge", "--frames", "2", "--variants", "upstream,sync_free_rope", "--warmup", "0") == 0
    data = load(out / "cpu")
    after = {(r["variant"], r["frames"], r["part"]): r for r in data["rows"]}
    assert len(after) == len(data["rows"])  # replaced, not duplicated
    assert set(after) == set(before) | {("sync_free_rope", 2, p) for p in ("full", "aggregator")}
    assert after[("exact", 1, "full")] == before[("exact", 1, "full")]  # kept
    assert after[("upstream", 2, "full")]["seconds_all"] != before[("upstream", 2, "full")]["seconds_all"]  # re-run
    assert after[("sync_free_rope", 2, "full")]["max_rel_err_vs_upstream"] < 1e-5
    assert len(data["meta"]["runs"]) == 2 and data["phases"]  # the first run's phases are kept
    # without --merge the folder starts afresh
    assert bench(out, "--frames", "1", "--variants", "upstream", "--warmup", "0", "--phases", "off") == 0
    assert {(r["variant"], r["frames"]) for r in load(out / "cpu")["rows"]} == {("upstream", 1)}


def test_merge_replaces_a_phase_split_whole() -> None:
    """A later run whose phases were hidden (a CUDA graph: its total only) must not inherit the earlier run's."""
    from vggt_turbo.bench.report import merge

    def phase(variant: str, frames: int, name: str, seconds: float) -> dict:
        return {"variant": variant, "frames": frames, "phase": name, "seconds": seconds, "calls": 1}

    base = {"meta": {}, "rows": [], "phases": [phase("exact", 10, "patch_embed", 0.02), phase("exact", 10, "total", 0.15),
                                               phase("exact", 100, "patch_embed", 0.2)]}
    new = {"meta": {}, "rows": [], "phases": [phase("exact", 10, "total", 0.14)]}
    got = {(p["frames"], p["phase"]): p["seconds"] for p in merge(base, new)["phases"]}
    assert got == {(10, "total"): 0.14, (100, "patch_embed"): 0.2}


def test_merge_refuses_other_setups(sweep: Path, tmp_path: Path) -> None:
    data = load(sweep)
    data["meta"]["gpu"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "latest.json").write_text(json.dumps(data))
    assert bench(tmp_path, "--merge", "--frames", "1") == 2


def test_aggregator_timed_alone_when_hooks_see_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On CUDA the presets replay the whole forward as one CUDA graph up to ``cuda_graph_max_frames`` (16) frames:
    hooks inside it never fire. Emulated here by hiding the hooks for ``exact``: the aggregator row then comes from the aggregator patched and
    called alone, and the phase split reports the total only."""
    import vggt_turbo.bench.measure as measure_mod
    import vggt_turbo.bench.sweep as sweep_mod

    hidden = {"on": False}
    run_variant = sweep_mod.Bench.run_variant

    def hiding(self, variant, *args, **kwargs):  # type: ignore[no-untyped-def]
        hidden["on"] = variant.name == "exact"
        try:
            return run_variant(self, variant, *args, **kwargs)
        finally:
            hidden["on"] = False

    monkeypatch.setattr(sweep_mod.Bench, "run_variant", hiding)
    monkeypatch.setattr(measure_mod, "_capturing", lambda: hidden["on"])
    assert bench(tmp_path, "--frames", "2", "--variants", "upstream,exact", "--phases", "2", "--warmup", "0") == 0
    data = load(tmp_path / "cpu")
    rows = {(r["variant"], r["part"]): r for r in data["rows"]}
    agg = rows[("exact", "aggregator")]
    assert "called alone" in agg["aggregator_timing"] and agg["seconds"] > 0
    assert agg["max_rel_err_vs_upstream"] < 1e-5 and "aggregator_timing" not in rows[("upstream", "aggregator")]
    assert [p["phase"] for p in data["phases"] if p["variant"] == "exact"] == ["total"]


def test_variants_follow_the_config() -> None:
    bools = [f.name for f in dataclasses.fields(TurboConfig)
             if (isinstance(getattr(TurboConfig(), f.name), bool) or f.name in AUTO_FLAGS)
             and f.name not in DISTRIBUTED_FIELDS | MODIFIER_FIELDS]
    variants = {v.name: v.config for v in flag_variants()}
    assert set(bools) <= set(variants) and not MODIFIER_FIELDS & set(variants)
    assert not DISTRIBUTED_FIELDS & set(variants)  # they need torchrun: bench --sequence-parallel
    assert variants["global_to_frame_layers"].global_to_frame_layers == PRESETS["fast"].global_to_frame_layers
    for name, cfg in variants.items():
        on = {b for b in bools if getattr(cfg, b)}
        assert on == ({name} if name in bools else set()) | set(flag_requirements().get(name, ())), (name, cfg)
    names = [v.name for v in select_variants(None)]
    assert names[0] == "upstream" and names[-2:] == ["exact", "fast"]
    assert [v.name for v in select_variants("fast,presets")] == ["upstream", "exact", "fast"]
    with pytest.raises(ValueError):
        select_variants("nope")
    extra = select_variants("exact,exact+compile+sdpa")
    assert [v.name for v in extra] == ["exact", "exact+compile+sdpa"]
    assert extra[1].config == PRESETS["exact"].replace(compile=True, sdpa=True)
    for bad in ("exact+nope", "nope+compile"):
        with pytest.raises(ValueError, match="nope"):
            select_variants(bad)
    switched = select_variants("exact-flash_attention_4+compile")[0]
    assert switched.config == PRESETS["exact"].replace(flash_attention_4=False, compile=True)
    without = select_variants("exact-sync_free_rope")[0].config  # the flags that need it go off with it
    assert not (without.sync_free_rope or without.cuda_graphs or without.fused_qk_norm_rope)
    with pytest.raises(ValueError, match="needs"):  # asked for, but it needs a flag the spec switches off
        select_variants("exact-sync_free_rope+cuda_graphs")


def test_cli_registers_bench() -> None:
    from vggt_turbo.cli import main as cli_main

    with pytest.raises(SystemExit) as done:
        cli_main(["bench", "--help"])
    assert done.value.code == 0


def test_import_needs_no_plotting() -> None:
    # torch itself may import tqdm (torch.hub); vggt_turbo must add neither tqdm nor matplotlib
    code = ("import sys, torch; before = set(sys.modules); import vggt_turbo, vggt_turbo.bench; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "assert not {'matplotlib', 'tqdm'} & new, new")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_profile_script_on_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_vggt.py"), "--device", "cpu", "--frames", "1",
         "--warmup", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["traceEvents"]
    assert any(e.get("name") == "global_block[0]" for e in trace["traceEvents"])
    assert "| 1 |" in (tmp_path / "top_kernels.md").read_text()


def test_deadline_budget_estimates_each_variant_from_its_own_calls() -> None:
    """A slow variant's calls do not make a fast one look slow (at 800 frames upstream takes ten times fast's time);
    a variant not seen yet is estimated from every variant's calls; the extrapolation is (S / S') ** 1.7."""
    budget = Budget(deadline=100.0, t0=time.perf_counter())
    budget.note("upstream", 400, 47.0)
    budget.note("fast", 400, 5.0)
    budget.note("upstream", 800, 180.0)
    assert budget.estimate(800, "upstream") == 180.0
    assert budget.estimate(800, "fast") == pytest.approx(5.0 * 2 ** 1.7)
    assert budget.estimate(800, "exact") == 180.0 and budget.estimate(400, "exact") == pytest.approx(26.0)
    assert budget.estimate(100, "fast") == 0.0  # nothing smaller seen: no estimate
    assert budget.allows(800, 2, "fast at 800 frames", "fast")
    assert not budget.allows(800, 1, "upstream at 800 frames", "upstream")
    assert budget.skipped == ["upstream at 800 frames"]
