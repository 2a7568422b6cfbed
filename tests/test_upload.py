"""``app.upload``: a checkpoint's tensors onto the device, bit for bit, dealt over workers by bytes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import needs_cuda
from vggt_turbo.app import upload, weights


def _checkpoint(tmp_path: Path) -> dict[str, torch.Tensor]:
    """Tensors of every kind a checkpoint holds, memory-mapped from a safetensors file as ``Plan`` maps them
    (one of them unaligned for its dtype, so a copy)."""
    tensors = {
        "a_odd_bf16": torch.randn(3, dtype=torch.bfloat16),
        "b_big": torch.randn(1000, 37),  # spans several staging buffers of the tests' size
        "c_scalar": torch.tensor(2.5, dtype=torch.float64),
        "d_empty": torch.zeros(0, 4),
        "e_int": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "f_bool": torch.tensor([True, False, True]),
        "g_half": torch.randn(2, 3, dtype=torch.float16),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    mapped = weights._map_safetensors(tmp_path / "t.safetensors")
    assert all(torch.equal(mapped[k], v) for k, v in tensors.items())
    return mapped


def _check(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], device: torch.device,
           dtypes: dict[str, torch.dtype]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        want = tensor.to(dtypes.get(name, tensor.dtype))
        assert got[name].device.type == device.type, name
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name].cpu(), want), name


def test_workers_get_about_the_same_bytes_largest_first() -> None:
    jobs = [(str(n), torch.empty(n, dtype=torch.uint8)) for n in (100, 90, 50, 40, 30, 20, 10)]
    shares = upload._shares(jobs, 3)
    loads = sorted(sum(t.numel() for _, t in share) for share in shares)
    assert loads == [110, 110, 120] and sum(len(s) for s in shares) == len(jobs)
    assert len(upload._shares(jobs[:2], 8)) == 2  # no idle worker
    assert upload._shares([], 8) == []


def test_on_the_cpu_the_tensors_are_the_files_and_convert_to_the_models_dtype(tmp_path: Path) -> None:
    mapped = _checkpoint(tmp_path)
    dtypes = {"g_half": torch.float32}
    got = upload.upload(mapped, torch.device("cpu"), dtypes)
    _check(got, mapped, torch.device("cpu"), dtypes)
    assert got["b_big"].data_ptr() == mapped["b_big"].data_ptr()  # the map itself: read when used, not copied


@needs_cuda
def test_on_the_gpu_bit_for_bit_through_small_staging_buffers_and_several_workers(tmp_path: Path) -> None:
    mapped = _checkpoint(tmp_path)
    device = torch.device("cuda")
    dtypes = {"g_half": torch.float32, "a_odd_bf16": torch.float32}
    for threads, staging in ((3, 1000), (1, 64), (8, 1 << 20)):  # 1000 and 64 bytes: slices end mid-element
        _check(upload.upload(mapped, device, dtypes, threads=threads, staging_bytes=staging), mapped, device, dtypes)


@needs_cuda
def test_on_the_gpu_the_copies_follow_work_queued_before_them(tmp_path: Path) -> None:
    """A target block freed and reused while a kernel still writes it must not be overwritten early: the
    workers' streams wait for the caller's."""
    mapped = {"w": torch.randn(4096, 1024)}
    device = torch.device("cuda")
    for _ in range(3):
        busy = torch.randn(4096, 4096, device=device)
        for _ in range(4):
            busy = busy @ busy / 64  # queued work on the current stream
        del busy
        got = upload.upload(mapped, device, threads=2, staging_bytes=1 << 20)
        assert torch.equal(got["w"].cpu(), mapped["w"])


def test_staging_buffers_are_pinned_or_the_copy_goes_tensor_by_tensor(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vggt_turbo.app.upload"):
        buffers = upload._pinned(3, 64)
    if torch.cuda.is_available():
        assert buffers is not None and len(buffers) == 3
        assert all(len(pair) == 2 and all(b.is_pinned() and b.numel() == 64 for b in pair) for pair in buffers)
    else:  # nothing to pin memory for: the fallback, said in the log
        assert buffers is None and "copied tensor by tensor" in caplog.text
