"""preview.png drawn by a Python process of its own, started when ``reconstruct`` starts.

Why: the export's writers share one interpreter, and its GIL: while the COLMAP text is formatted (pure Python)
nothing else in the process takes a step, and drawing the preview (numpy and Pillow) would queue behind it and
the other writers. In a process of its own it runs beside them; measured faster than drawing in-process on a
2-core machine and no slower on a 16-core GPU host (benchmarks/RESULTS.md, "the export's GIL"). The worker
imports numpy and Pillow while the command decodes the frames and loads the model, then waits; the export sends
it a small ``PreviewInputs`` record (``preview_inputs``: at most 100,000 points and six thumbnails, a few MB) and
the worker writes the file. The worker imports no torch (``vggt_turbo``'s names are imported lazily), so it costs
one core while it draws and some tens of MB of memory.

The protocol is pickle over the worker's stdin and stdout: one ``(path, inputs)`` per job; the reply ``None``, or
the exception the drawing raised (re-raised here, its traceback attached as a note), so that a full disk is still
the ``OSError`` that ``export.staged_directory`` reports in one line. The worker ignores Ctrl-C (the command
handles it and closes the pipe) and exits when its stdin closes, also when the command's process ends abruptly.

Where the worker cannot start, dies, or answers with something else than the protocol (a ``sitecustomize`` that
prints, say), the preview is drawn in this process as before (logged): slower, never missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

import numpy as np

from .preview_inputs import PreviewInputs, preview_inputs

log = logging.getLogger(__name__)

# The worker's command: this package's root first on its path, so it runs this very code (an editable checkout,
# a PYTHONPATH), then ``main``.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[1]); from vggt_turbo.app.preview_process import main; main()"
# The drawing's matrix products are tiny (100,000 x 3 by 3 x 3): one BLAS/OpenMP thread, not a pool of one per
# core woken for each, beside the command's own threads. Values the user set are kept.
_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class PreviewProcess:
    """The worker process, started by the constructor; ``render_preview`` cuts the inputs down here and has the
    worker draw them (``preview.render``).

    Not thread-safe beyond one job at a time, which is what the export asks of it.
    """

    def __init__(self, quiet: bool = False) -> None:
        self._proc: Optional[subprocess.Popen[bytes]] = None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_ROOT], env={**_ONE_THREAD, **os.environ},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None,
            )
        except OSError as exc:
            log.info("preview: no worker process (%s); drawing in this process", exc)

    @property
    def running(self) -> bool:
        """Whether jobs go to the worker (False: drawn in this process)."""
        return self._proc is not None

    def render_preview(self, path: Path, xyz: np.ndarray, rgb: np.ndarray, extrinsics: np.ndarray,
                       intrinsics: np.ndarray, frames: np.ndarray, depth: np.ndarray, names: Sequence[str],
                       notes: Sequence[str] = ()) -> None:
        """Write the preview to ``path``: the inputs cut down here, drawn by the worker (arguments as for
        ``preview_inputs``)."""
        self.render(path, preview_inputs(xyz, rgb, extrinsics, intrinsics, frames, depth, names, notes))

    def render(self, path: Path, inputs: PreviewInputs) -> None:
        """Write the preview of ``inputs`` to ``path``; returns when the file is written, raises what drawing raised."""
        if self._proc is not None:
            try:
                reply = self._ask(self._proc, (str(path), inputs))
            except Exception as exc:  # noqa: BLE001 - the worker is gone, or its replies are not ours to read
                log.info("preview: no answer from the worker process (%s: %s); drawing in this process",
                         type(exc).__name__, exc)
                self.close()
            else:
                if reply is not None:
                    raise reply
                return
        from .preview import render

        render(path, inputs)

    @staticmethod
    def _ask(proc: subprocess.Popen[bytes], job: tuple[str, PreviewInputs]) -> Optional[BaseException]:
        assert proc.stdin is not None and proc.stdout is not None
        pickle.dump(job, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.flush()
        reply = pickle.load(proc.stdout)
        if reply is not None and not isinstance(reply, BaseException):
            raise pickle.UnpicklingError(f"unexpected reply {type(reply).__name__}")
        return reply

    def close(self) -> None:
        """End the worker: its stdin closed, an idle worker exits at once; one still importing (a run that failed
        early) is killed rather than waited for. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def started(quiet: bool = False) -> Iterator[PreviewProcess]:
    """A ``PreviewProcess``, closed on exit whatever happened."""
    process = PreviewProcess(quiet)
    try:
        yield process
    finally:
        process.close()


def main() -> None:
    """The worker: import the drawing code, then draw each job from stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle: it closes our stdin
    jobs: BinaryIO = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever a library prints cannot corrupt the replies
    try:
        from .preview import render
    except BaseException as exc:  # noqa: BLE001 - reported with every job, as drawing in-process would fail
        render, failure = None, exc
    while True:
        try:
            path, inputs = pickle.load(jobs)
        except EOFError:
            break
        try:
            if render is None:
                raise failure
            render(Path(path), inputs)
            reply: Optional[BaseException] = None
        except Exception as exc:  # noqa: BLE001 - sent back, raised there
            reply = _portable(exc)
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()
    replies.close()
    os._exit(0)  # nothing to tear down: skip the interpreter's teardown


def _portable(exc: BaseException) -> BaseException:
    """``exc`` with its traceback as a note, if it survives pickling; else a RuntimeError saying what it was."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    note = f"in the preview's worker process:\n{text}"
    try:
        copy = pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - not every exception pickles
        copy = RuntimeError(f"{type(exc).__name__}: {exc}")
    if hasattr(copy, "add_note"):  # Python 3.11 on
        copy.add_note(note)
    return copy
