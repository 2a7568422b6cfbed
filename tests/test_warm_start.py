"""``app.warm_start``: the start-up steps run beside the main thread, in order, never raise, and are joined."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from helpers import needs_cuda
from vggt_turbo.app import warm_start


def test_steps_run_in_order_on_another_thread_and_a_failing_step_is_logged_and_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, torch.device, bool]] = []

    def first(device: torch.device) -> None:
        seen.append(("first", device, threading.current_thread() is threading.main_thread()))

    def broken(device: torch.device) -> None:
        raise RuntimeError("no driver")

    def last(device: torch.device) -> None:
        seen.append(("last", device, threading.current_thread() is threading.main_thread()))

    device = torch.device("cuda")  # only passed to the steps: these touch no GPU
    warm = warm_start.WarmStart(device, (first, broken, last))
    warm.wait()  # not started: nothing to wait for
    with caplog.at_level(logging.INFO, logger="vggt_turbo.app.warm_start"):
        warm.start()
        warm.wait()
    assert seen == [("first", device, False), ("last", device, False)]
    assert "broken skipped (RuntimeError: no driver)" in caplog.text


def test_the_default_steps_are_for_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    monkeypatch.setattr(warm_start, "CUDA_STEPS", (lambda device: ran.append(device.type),))
    with warm_start.running(torch.device("cpu")):
        pass
    with warm_start.running(torch.device("cuda")):
        pass
    assert ran == ["cuda"]


def test_the_run_waits_for_the_steps_when_it_ends_early() -> None:
    release, done = threading.Event(), []

    def slow(device: torch.device) -> None:
        release.wait(5)
        done.append(device)

    with pytest.raises(KeyError):
        with warm_start.running(torch.device("cuda"), (slow,)):
            release.set()
            raise KeyError("a phase failed")
    assert done == [torch.device("cuda")]  # joined before the error left the block


def test_the_kernel_modules_are_found_in_the_kernels_package() -> None:
    found = warm_start.kernel_modules()
    assert {"vggt_turbo.kernels._scale_add_triton", "vggt_turbo.kernels._qk_norm_rope_triton",
            "vggt_turbo.kernels._bilinear_triton", "vggt_turbo.kernels._conv_epilogue_triton"} <= set(found)
    assert all(name.endswith("_triton") for name in found)


@needs_cuda
def test_on_a_gpu_the_steps_leave_cuda_and_triton_ready() -> None:
    with warm_start.running(torch.device("cuda")) as warm:
        warm.wait()
        assert torch.cuda.is_initialized()
    from vggt_turbo.kernels import triton_installed

    if triton_installed():
        key = warm_start._triton_key()
        assert key is not None
        if hasattr(key, "cache_info"):  # memoised (Triton 3.x): computed once, by the warm start
            assert key.cache_info().currsize == 1
