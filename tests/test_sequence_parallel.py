"""sequence_parallel: on 2 and 3 CPU processes (gloo) the outputs equal the single-process model's, each rank
embeds only its frames and every global layer that attends across frames runs two all-to-alls; bad configs and
bad calls are refused; the multi-GPU bench mode runs under torchrun.

The multi-process cases run in one spawn per world size (starting processes costs seconds; the cases
milliseconds): every rank builds the small model itself (seeded, so the same weights everywhere), runs every case
and writes what it saw to a JSON file that the tests below check. Cases are uneven on purpose: 5 frames on 2 or
3 ranks (3/2 and 2/2/1), 2 frames on 3 ranks and 1 frame on any (fewer frames than ranks: the whole sequence runs
on every rank), batches of 1 and 2, and 3 ranks over the small model's 4 heads (2/1/1).

References: upstream unpatched for the exact configs, the same config in one process for the approximate one
(``global_to_frame_layers``). The track head is not compared: sequence parallelism refuses ``query_points``.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import assert_equal, assert_unchanged, errors, layer_outputs, run, snapshot

import vggt_turbo
from vggt_turbo import TurboConfig, describe
from vggt_turbo.bench.parallel import multicast_problems
from vggt_turbo.bench.parallel_report import max_frames
from vggt_turbo.distributed import Shard, split
from vggt_turbo.patches import _token_slices
from vggt_turbo.patches.patch_embed import chunked_patch_embed
from vggt_turbo.patches.runtime import offload_intermediates
from vggt_turbo.patches.runtime import sequence_parallel as sp
from vggt_turbo.random_model import build_vggt, random_images

ROOT = Path(__file__).resolve().parents[1]
WORLDS = (2, 3)
TOL = 1e-5  # relative, fp32 on the CPU
BF16_TOL = 1e-3
DEPTH = 24  # global layers of the small model
EXACT = TurboConfig.preset("exact")
# offloading forced on (concurrent_heads, a 1-frame patch, does not run with it: patches refuse the pair)
OFFLOAD = EXACT.replace(offload_intermediates=True, concurrent_heads=False)
SWAPPED = EXACT.replace(global_to_frame_layers=(0, 1, 2, 3, 4))
EVERY_FLAG = EXACT.replace(sdpa=True, sdpa_backend="math", fused_frame_batching=True, nvtx=True)


@dataclass(frozen=True)
class Case:
    frames: int
    batch: int
    config: TurboConfig
    output: str = "gathered"
    root: str = "vggt"  # or "aggregator": an Aggregator patched alone
    older_layout: bool = False  # upstream before 2025-11 keeps all 24 intermediates
    small_mlp_chunks: bool = False  # chunked_mlp and chunked_patch_embed slice even these short sequences
    offload: bool = False  # offload_intermediates=True, its "host memory" float64 tensors on the CPU (see _offloading)


CASES = {
    "S5-B1": Case(5, 1, EXACT),
    "S2-B2": Case(2, 2, EXACT),
    "S1-B1": Case(1, 1, EXACT),
    "S5-B2-global_to_frame": Case(5, 2, SWAPPED),
    "S5-B1-every-flag": Case(5, 1, EVERY_FLAG, small_mlp_chunks=True),
    "S5-B2-sharded": Case(5, 2, EXACT, output="sharded"),
    "S2-B1-sharded": Case(2, 1, EXACT, output="sharded"),
    "S5-B1-older-layout": Case(5, 1, EXACT, older_layout=True),
    "S5-B2-aggregator": Case(5, 2, EXACT, root="aggregator"),
    "S5-B1-aggregator-sharded": Case(5, 1, EXACT, root="aggregator", output="sharded"),
    "S5-B2-offload": Case(5, 2, OFFLOAD, offload=True),
    "S5-B1-offload-sharded": Case(5, 1, OFFLOAD, output="sharded", offload=True),
}


# --- spawning ranks -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, backend: str, fn: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a hang becomes an error
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], world: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, *args)`` on ``world`` fresh processes in one process group; a rank's exception fails it."""
    mp.spawn(_rank_main, args=(world, free_port(), backend, fn, args), nprocs=world, join=True)


# --- what each rank runs --------------------------------------------------------------------------------------


def _patched(model: nn.Module, config: Optional[TurboConfig]) -> nn.Module:
    copied = copy.deepcopy(model)
    return vggt_turbo.apply_optimizations(copied, config) if config is not None else copied


class Counters:
    """All-to-alls made by the patch, and frames embedded, on this rank."""

    def __init__(self) -> None:
        self.all_to_all = self.embedded = 0
        original = sp.all_to_all

        def counted(*args: Any) -> torch.Tensor:
            self.all_to_all += 1
            return original(*args)

        sp.all_to_all = counted

    def watch(self, model: nn.Module) -> None:
        agg = model.aggregator if hasattr(model, "aggregator") else model
        agg.patch_embed.register_forward_pre_hook(lambda _, args: setattr(self, "embedded", self.embedded + args[0].shape[0]))


def _outputs(model: nn.Module, images: torch.Tensor, root: str) -> dict[str, torch.Tensor]:
    if root == "vggt":
        return run(model, images)
    with torch.no_grad():
        return layer_outputs(model(images)[0])


class _Offloading:
    """``offload_intermediates`` on the CPU: it applies to CUDA calls only and pins host memory, so here it applies
    to every call and "moves" each kept layer to float64, a storage the heads' input wrappers must convert back
    from, exactly as they fetch from host memory on a GPU (float32 -> float64 -> float32 is exact). Counts the
    layers stored."""

    def __init__(self) -> None:
        self.stored = 0

    def __enter__(self) -> "_Offloading":
        self._saved = offload_intermediates.applies, offload_intermediates.to_host
        offload_intermediates.applies = lambda agg, images: not agg.training and not torch.is_grad_enabled()
        offload_intermediates.to_host = self._store
        return self

    def _store(self, t: torch.Tensor, side: object = None) -> torch.Tensor:
        self.stored += 1
        return t.to(torch.float64)

    def __exit__(self, *exc: Any) -> None:
        offload_intermediates.applies, offload_intermediates.to_host = self._saved


def _run_case(base: nn.Module, case: Case, counters: Counters) -> dict[str, Any]:
    if case.older_layout:
        base = copy.deepcopy(base)
        base.aggregator.cached_layer_indices = set(range(DEPTH))
    module = base if case.root == "vggt" else base.aggregator
    images = random_images(case.frames, batch=case.batch, seed=case.frames + 10 * case.batch)
    expected = _outputs(_patched(module, None if case.config.is_exact else case.config), images, case.root)
    if case.output == "sharded":
        frames = Shard(split(case.frames, dist.get_world_size()), dist.get_rank()).frames
        expected = {k: v[:, frames] for k, v in expected.items()}
    model = _patched(module, case.config.replace(sequence_parallel=True, sequence_parallel_output=case.output))
    counters.all_to_all = counters.embedded = 0
    counters.watch(model)
    chunk, frames_chunk = _token_slices.CHUNK_TOKENS, chunked_patch_embed.CHUNK_FRAMES
    _token_slices.CHUNK_TOKENS = 16 if case.small_mlp_chunks else chunk
    chunked_patch_embed.CHUNK_FRAMES = 1 if case.small_mlp_chunks else frames_chunk
    offloading = _Offloading()
    try:
        if case.offload:
            with offloading:
                out = _outputs(model, images, case.root)
        else:
            out = _outputs(model, images, case.root)
    finally:
        _token_slices.CHUNK_TOKENS, chunked_patch_embed.CHUNK_FRAMES = chunk, frames_chunk
    return {"errors": errors(out, expected), "all_to_all": counters.all_to_all, "embedded": counters.embedded,
            "offloaded": offloading.stored}


def _bf16_autocast(base: nn.Module) -> dict[str, Any]:
    """The exact preset under CPU bf16 autocast (so bf16_weights runs): sequence parallel vs one process."""
    images = random_images(5, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        upstream = run(base, images)
        expected = run(_patched(base, EXACT), images)
        out = run(_patched(base, EXACT.replace(sequence_parallel=True)), images)
    return {"errors": errors(out, expected), "vs_upstream_autocast": max(errors(out, upstream).values())}


def _unbatched(base: nn.Module) -> dict[str, Any]:
    """(S, 3, H, W) images, which upstream's VGGT.forward accepts too."""
    images = random_images(5, seed=4)[0]
    out = run(_patched(base, EXACT.replace(sequence_parallel=True)), images)
    return {"errors": errors(out, run(base, images))}


def _error(call: Callable[[], Any]) -> str:
    try:
        call()
    except (RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _refusals(base: nn.Module, rank: int) -> dict[str, str]:
    model = _patched(base, EXACT.replace(sequence_parallel=True))
    images = random_images(5)
    query_points = torch.tensor([[[8.0, 12.0]]])
    refused = {
        "autograd": _error(lambda: model(images)),
        "query_points": _error(lambda: run(model, images, query_points)),
        "shapes": _error(lambda: run(model, random_images(4 + rank))),
    }
    model.train()
    refused["training"] = _error(lambda: run(model, images))
    return refused


def _all_cases(rank: int, out_dir: str) -> None:
    base = build_vggt("small")  # with a track head: query_points must be refused
    counters = Counters()
    results: dict[str, Any] = {name: _run_case(base, case, counters) for name, case in CASES.items()}
    results["bf16-autocast"] = _bf16_autocast(base)
    results["unbatched"] = _unbatched(base)
    results["refusals"] = _refusals(base, rank)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


# Two ranks in the default suite (5 frames split unevenly, every case); three ranks (about 40 s to spawn on a
# 2-core CPU) with the slow tests.
@pytest.fixture(scope="module", params=[pytest.param(w, marks=pytest.mark.slow) if w > 2 else w for w in WORLDS],
                ids=lambda w: f"{w}-ranks")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each rank of a ``request.param``-process group saw, in rank order."""
    out = tmp_path_factory.mktemp(f"sequence_parallel_{request.param}")
    spawn(_all_cases, request.param, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(request.param)]


# --- multi-process tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CASES, "unbatched"])
def test_outputs_equal_the_single_process_model(ranks, name: str) -> None:
    for rank, seen in enumerate(ranks):
        errs = seen[name]["errors"]
        assert errs and max(errs.values()) < TOL, (rank, errs)


@pytest.mark.parametrize("name", CASES)
def test_each_rank_embeds_its_frames_and_global_layers_communicate(ranks, name: str) -> None:
    case, world = CASES[name], len(ranks)
    for rank, seen in enumerate(ranks):
        if case.frames < world:  # the whole sequence on every rank, no collective inside the forward
            assert (seen[name]["embedded"], seen[name]["all_to_all"]) == (case.batch * case.frames, 0)
            continue
        frames_here = case.frames // world + (rank < case.frames % world)
        across_frames = DEPTH - len(case.config.global_to_frame_layers)  # the others are frame attention: local
        assert seen[name]["embedded"] == case.batch * frames_here
        assert seen[name]["all_to_all"] == 2 * across_frames


def test_offloaded_layers_are_each_ranks_own(ranks) -> None:
    """With offload_intermediates the kept layers were stored away on every rank (4 in the small model) and the
    outputs above still equal one process's; without it, nothing was."""
    for seen in ranks:
        assert [seen[name]["offloaded"] for name in CASES if CASES[name].offload] == [4, 4]
        assert all(seen[name]["offloaded"] == 0 for name in CASES if not CASES[name].offload)


def test_bf16_weights_runs_under_sequence_parallel(ranks) -> None:
    for seen in ranks:
        bf16 = seen["bf16-autocast"]
        assert max(bf16["errors"].values()) < BF16_TOL, bf16
        assert bf16["vs_upstream_autocast"] > BF16_TOL, "bf16_weights did not run (output equals upstream's autocast)"


def test_bad_calls_refused_on_every_rank(ranks) -> None:
    for refused in (seen["refusals"] for seen in ranks):
        assert refused["autograd"].startswith("RuntimeError") and "inference-only" in refused["autograd"]
        assert refused["training"].startswith("RuntimeError") and "inference-only" in refused["training"]
        assert refused["query_points"].startswith("ValueError") and "track head" in refused["query_points"]
        assert refused["shapes"].startswith("ValueError") and "same images" in refused["shapes"]


# --- one process ----------------------------------------------------------------------------------------------


@pytest.fixture
def one_rank():
    """A process group of one rank (gloo) in this process."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_split_and_shards() -> None:
    assert split(5, 3) == (2, 2, 1) and split(1, 3) == (1, 0, 0) and split(16, 3) == (6, 5, 5)
    shard = Shard((2, 2, 1), rank=2)
    assert shard.frames == slice(4, 5) and shard.distributed
    assert not Shard((1, 0, 0), rank=1).distributed and Shard((1, 0, 0), rank=1).frames == slice(1, 1)


def test_config_takes_a_process_group_and_serialises_it(one_rank) -> None:
    config = TurboConfig(sequence_parallel=one_rank, sequence_parallel_output="sharded")
    described = json.loads(json.dumps(config.as_dict()))
    assert described["sequence_parallel"] == "ProcessGroup(gloo, 1 ranks)"
    assert described["sequence_parallel_output"] == "sharded"
    assert TurboConfig(sequence_parallel=True).as_dict()["sequence_parallel"] is True
    assert config == TurboConfig(sequence_parallel=one_rank, sequence_parallel_output="sharded")


@pytest.mark.parametrize(("flags", "error"), [
    ({"sequence_parallel": "yes"}, TypeError),
    ({"sequence_parallel": 1}, TypeError),
    ({"sequence_parallel": None}, TypeError),
    ({"sequence_parallel_output": "rank0"}, ValueError),
    ({"sequence_parallel_output": None}, ValueError),
])
def test_bad_values_refused(flags: dict, error: type[Exception]) -> None:
    with pytest.raises(error, match="sequence_parallel"):
        TurboConfig(**flags)


def test_a_destroyed_group_still_serialises() -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    config = TurboConfig(sequence_parallel=dist.group.WORLD)
    dist.destroy_process_group()
    assert config.as_dict()["sequence_parallel"] == "ProcessGroup(unknown backend, 1 ranks)"


def test_apply_without_a_process_group_refused(model) -> None:
    assert not dist.is_initialized()
    before = snapshot(model)
    with pytest.raises(ValueError, match="init_process_group"):
        vggt_turbo.apply_optimizations(model, sequence_parallel=True)
    assert_unchanged(model, before)


def test_one_rank_gives_the_other_patches_outputs_bit_for_bit(model, images, one_rank) -> None:
    expected = run(_patched(model, EXACT), images)
    vggt_turbo.apply_optimizations(model, sequence_parallel=True)
    assert_equal(run(model, images), expected)
    targets = describe(model).targets["sequence_parallel"]
    assert {"forward", "aggregator.forward", "aggregator._process_frame_attention", "camera_head.forward",
            "depth_head.forward", "point_head.forward", "aggregator.global_blocks.0.attn.forward"} <= set(targets)
    assert len([t for t in targets if t.endswith("attn.forward")]) == DEPTH


def test_global_to_frame_layers_keep_their_local_attention(model, one_rank) -> None:
    vggt_turbo.apply_optimizations(model, SWAPPED.replace(sequence_parallel=True))
    attentions = {t for t in describe(model).targets["sequence_parallel"] if t.endswith("attn.forward")}
    assert attentions == {f"aggregator.global_blocks.{i}.attn.forward" for i in range(5, DEPTH)}


def test_one_rank_still_refuses_training_and_autograd(model, images, one_rank) -> None:
    vggt_turbo.apply_optimizations(model, sequence_parallel=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        model(images)


def test_more_ranks_than_heads_refused(model, one_rank, monkeypatch) -> None:
    monkeypatch.setattr(sp, "world_size", lambda group: 5)  # the small model has 4 heads
    before = snapshot(model)
    with pytest.raises(ValueError, match="at least as many attention heads; this model has 4"):
        vggt_turbo.apply_optimizations(model, sequence_parallel=True)
    assert_unchanged(model, before)


def test_unverified_combination_refused(model, one_rank) -> None:
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"not supported together with \['compile'\].*compile=False"):
        vggt_turbo.apply_optimizations(model, compile=True, sequence_parallel=True)
    assert_unchanged(model, before)


def test_offload_intermediates_applies_under_sequence_parallel(model, one_rank) -> None:
    for value in (True, "auto"):
        vggt_turbo.apply_optimizations(model, offload_intermediates=value, concurrent_heads=value is not True,
                                       sequence_parallel=True)
        assert "offload_intermediates" in describe(model).targets


def test_revert_leaves_nothing(model, images, one_rank) -> None:
    before, expected = snapshot(model), run(model, images)
    vggt_turbo.apply_optimizations(model, sequence_parallel=True)
    vggt_turbo.revert_optimizations(model)
    assert_unchanged(model, before)
    assert_equal(run(model, images), expected)


# --- the bench mode -------------------------------------------------------------------------------------------


def test_nccl_refused_unless_nvlink_multicast_is_off() -> None:
    assert multicast_problems({}) and multicast_problems({"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"})
    assert multicast_problems({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}) == []


def test_max_frames_extends_the_measured_line() -> None:
    rows = [  # 10 GiB fixed + 0.1 GiB per frame on 1 GPU, 10 + 0.05 on 2
        {"variant": "exact", "gpus": g, "frames": f, "peak_reserved_gib_per_gpu": [10 + f * 0.1 / g] * g}
        for g in (1, 2) for f in (100, 200)
    ] + [{"variant": "exact", "gpus": 2, "frames": 300, "error": "OOM"}]
    fits = {f["gpus"]: f for f in max_frames(rows, capacity_gib=80.0)}
    assert fits[1]["predicted_max_frames"] == 700 and fits[2]["predicted_max_frames"] == 1400
    assert fits[1]["fixed_gib"] == pytest.approx(10) and fits[2]["fitted_frames"] == [100, 200]
    assert max_frames(rows[:1], capacity_gib=80.0) == []  # one frame count: no line


def test_bench_mode_on_two_cpu_processes(tmp_path: Path) -> None:
    """The launcher the GPUs use (torchrun), on the CPU with gloo: 1 vs 2 processes, rows with a ``gpus`` field."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "vggt_turbo.cli",
           "bench", "--sequence-parallel", "--device", "cpu", "--frames", "2,3", "--repeats", "1", "--warmup", "0",
           "--max-frames", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((tmp_path / "cpu" / "sequence_parallel.json").read_text())
    assert data["meta"]["gpus"] == 2 and data["meta"]["backend"] == "gloo"
    rows = {(r["gpus"], r["frames"]): r for r in data["rows"]}
    assert set(rows) == {(g, f) for g in (1, 2) for f in (2, 3)}
    for frames in (2, 3):
        multi = rows[(2, frames)]
        assert multi["variant"] == "exact" and multi["config"]["sequence_parallel"] is True
        assert multi["speedup_vs_1gpu"] > 0 and multi["max_rel_err_vs_1gpu"] < TOL
        assert len(multi["peak_gib_per_gpu"]) == 2 and rows[(1, frames)]["seconds"] > 0
    assert "| 3 | exact | 2 |" in (tmp_path / "cpu" / "sequence_parallel.md").read_text()


# --- GPUs (NCCL) ----------------------------------------------------------------------------------------------


def _on_gpus(rank: int, out_dir: str) -> None:
    device = torch.device("cuda", rank)
    base = build_vggt("small", enable_track=False).to(device)
    images = random_images(5).to(device)
    results = {}
    for name, autocast, config in (("fp32", False, EXACT), ("bf16", True, EXACT),
                                   ("bf16-offload", True, OFFLOAD)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            expected = run(_patched(base, config), images)
            out = run(_patched(base, config.replace(sequence_parallel=True)), images)
        results[name] = errors(out, expected)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_over_nccl_equal_one(tmp_path: Path, monkeypatch) -> None:
    for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
        monkeypatch.setenv(key, value)  # NVLink multicast stays off on these machines
    spawn(_on_gpus, 2, str(tmp_path), backend="nccl")
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert max(seen["fp32"].values()) < 1e-3, seen  # TF32 convolutions may differ in the last bits
        assert max(seen["bf16"].values()) < 2e-2, seen  # bf16 kernels on different row counts
        assert max(seen["bf16-offload"].values()) < 2e-2, seen  # layers in host memory, camera tokens gathered on the GPU
