"""The side CUDA streams of one patched model, made on first use and kept for its later calls — shared by
``offload_intermediates`` (its host transfers, through ``_head_inputs``) and ``concurrent_heads`` (a stream per
head). Per model, not global: two models never order their work on each other's streams."""

from __future__ import annotations

from typing import Mapping, Optional

import torch


class Streams:
    """One stream per device and name; a name's stream has the priority ``priorities`` gives it (default 0, the
    lowest; lower is higher). The unnamed one (``""``) carries transfers."""

    def __init__(self, priorities: Optional[Mapping[str, int]] = None) -> None:
        self._priorities = priorities or {}
        self._streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}

    def get(self, device: torch.device, name: str = "") -> torch.cuda.Stream:
        key = (device, name)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = torch.cuda.Stream(device, priority=self._priorities.get(name, 0))
        return stream

    def after_current(self, device: torch.device) -> torch.cuda.Stream:
        """The transfer stream, ordered after the work queued on the current stream so far."""
        stream = self.get(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    def synchronize(self, device: torch.device) -> None:
        """Wait for the transfers issued so far (none if the stream was never made)."""
        stream = self._streams.get((device, ""))
        if stream is not None:
            stream.synchronize()
