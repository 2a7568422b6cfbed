"""images/ encoded while the model loads and runs, written at export (issue #20 item 4: export off the critical path).

Why: the frames as the model saw them are known once they are loaded, long before the predictions. Encoding them
(PNG or JPEG, a few tens of milliseconds per frame on one core) was the export's largest job on a machine with few
cores. Here each frame is encoded on a thread of its own pool as soon as the input is loaded (PIL releases the GIL
while it encodes), into memory (``export.encode_image``); the export only writes the bytes.

The cost is host memory held during the forward: the frames as uint8 (which the export needs anyway) and their
encodings, smaller than that (together about 1 GB for 1000 frames at 518x392), beside the float input itself
(2.4 GB there).

Nothing is written before the export: the output's staging folder exists only there, so a run that fails earlier
leaves nothing, as before. Leaving the ``with`` block (normally or by an exception) cancels what has not started
and waits for what has.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Optional, Sequence

import numpy as np

from . import export, inputs


class FramesAhead:
    """Frames (S, H, W, 3) uint8 encoded under ``names`` (``export.output_image_names``), one job per frame."""

    def __init__(self, colors: np.ndarray, names: Sequence[str]) -> None:
        # One core left to the thread that loads the weights and launches the model's kernels.
        self._pool = ThreadPoolExecutor(max(1, inputs.workers() - 1), thread_name_prefix="vggt-turbo-frames")
        self.names = list(names)
        self._jobs: list[Future[bytes]] = [self._pool.submit(export.encode_image, rgb, name) for rgb, name in zip(colors, names)]

    def write(self, folder: Path, index: int) -> None:
        """Frame ``index`` into ``folder`` (waits for its encoding; re-raises its error)."""
        (folder / self.names[index]).write_bytes(self._jobs[index].result())

    def __enter__(self) -> "FramesAhead":
        return self

    def __exit__(self, kind: Optional[type], value: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
