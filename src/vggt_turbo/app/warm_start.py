"""A one-shot run's per-process start-up costs on the GPU, paid on a background thread while frames and weights load.

Why: a command that runs one forward pays, before and in that forward, costs that depend on neither the model
nor the frames: creating the CUDA context, loading cuBLAS and cuDNN, importing Triton and computing Triton's
cache key (a hash of Triton's own source files, once per process, before the first kernel of the process is
looked up in the on-disk cache). Profiled on an H200, these were about half a second of a first forward that
took 1.5 s and a quarter of a second before it (benchmarks/RESULTS.md). A thread started when the command
starts does them while the main thread decodes the frames and reads the checkpoint (file reads, decoding and
host-to-device copies release the GIL); the main thread waits for it before the forward, where it would
otherwise pay what is left itself. (The preview's drawing code is imported by a process of its own:
``preview_process``.)

Nothing here changes what the run computes: the context, the libraries and Triton's key are what the run would
create anyway; the two small products only make cuBLAS and cuDNN load. A step that fails is logged and skipped:
the run then meets the same problem itself and reports it where it always has.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
import threading
from typing import Callable, Iterator, Optional, Sequence

import torch

from .. import kernels
from ..kernels import triton_installed

log = logging.getLogger(__name__)

Step = Callable[[torch.device], None]


def kernel_modules() -> list[str]:
    """The Triton kernel modules (``kernels/_*_triton.py``: each imports triton and defines its kernels)."""
    return [f"{kernels.__name__}.{m.name}" for m in pkgutil.iter_modules(kernels.__path__) if m.name.endswith("_triton")]


def cuda_context(device: torch.device) -> None:
    """The CUDA context on ``device`` (the first allocation creates it)."""
    torch.empty(1, device=device)


def math_libraries(device: torch.device) -> None:
    """cuBLAS and cuDNN loaded and their handles made, by one tiny product of each (in fp32, which every GPU
    runs)."""
    a = torch.ones(16, 16, device=device)
    torch.mm(a, a)
    torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8, device=device), torch.ones(4, 3, 3, 3, device=device))
    torch.cuda.synchronize(device)


def triton_kernels(device: torch.device) -> None:
    """Triton and the kernel modules imported, and Triton's per-process cache key computed."""
    if not triton_installed():
        return
    for name in kernel_modules():
        importlib.import_module(name)
    key = _triton_key()
    if key is not None:
        key()


def _triton_key() -> Callable[[], str] | None:
    """Triton's memoised key function: ``triton.runtime.cache.triton_key`` (Triton 3.4 on),
    ``triton.compiler.compiler.triton_key`` before; None in a version that has neither."""
    for module in ("triton.runtime.cache", "triton.compiler.compiler"):
        try:
            key = getattr(importlib.import_module(module), "triton_key", None)
        except ImportError:
            continue
        if callable(key):
            return key
    return None


CUDA_STEPS: tuple[Step, ...] = (cuda_context, math_libraries, triton_kernels)


class WarmStart:
    """The steps, run in order on a daemon thread; ``wait`` joins it."""

    def __init__(self, device: torch.device, steps: Sequence[Step]) -> None:
        self._device = device
        self._steps = tuple(steps)
        self._thread = threading.Thread(target=self._run, name="vggt-turbo-warm-start", daemon=True)

    def start(self) -> None:
        if self._steps:  # no thread for nothing to do (the CPU)
            self._thread.start()

    def wait(self) -> None:
        if self._thread.ident is not None:  # started
            self._thread.join()

    def _run(self) -> None:
        for step in self._steps:
            try:
                step(self._device)
            except Exception as exc:  # the forward meets and reports the same problem itself
                log.info("warm start: %s skipped (%s: %s)", step.__name__, type(exc).__name__, exc)


@contextlib.contextmanager
def running(device: torch.device, steps: Optional[Sequence[Step]] = None) -> Iterator[WarmStart]:
    """A started ``WarmStart`` of ``steps`` (default: ``CUDA_STEPS`` on a CUDA ``device``, none on any other),
    joined on exit so that no step outlives the run."""
    if steps is None:
        steps = CUDA_STEPS if device.type == "cuda" else ()
    warm = WarmStart(device, steps)
    warm.start()
    try:
        yield warm
    finally:
        warm.wait()
