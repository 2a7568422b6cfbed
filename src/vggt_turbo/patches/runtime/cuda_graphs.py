"""cuda_graphs — wraps ``VGGT.forward(images, query_points=None)`` (or ``Aggregator.forward(images)`` when an
Aggregator is patched alone) with CUDA-graph capture and replay.

Why faster: at a few frames VGGT is host-bound — about 1,500 kernel launches per forward, each costing more CPU
time than the GPU needs to run it (the 1-frame speed-ups in benchmarks/RESULTS.md). A captured graph replays all launches at once. Capture needs a forward with no device-to-host sync and
no host-to-device copy, hence the prerequisites ``sync_free_rope`` and ``cached_positions``.

How: per model and input signature (shape, dtype, device, autocast and inference-mode state), the first call warms
up on a side stream and captures; later calls copy the input into the graph's static buffer, replay, and return
clones of the outputs (so a later call never overwrites what the caller holds). Each graph records the parameter
storage it was captured with (every parameter's and buffer's address and in-place version). A later call replays
first and checks that storage after, while the GPU runs the replay: the check's host time, done before the
replay, would leave the GPU idle for a noticeable share of a 1-frame call. When it finds a change,
that replay's outputs are discarded, every graph is dropped (all were captured with the old storage) and the
call captures anew. A replay that runs before its check reads only memory that is still allocated: each graph
holds the storage of the parameters and buffers it was captured with until it is dropped.
At most ``MAX_GRAPHS`` signatures are kept (least recently used evicted): each holds the activation memory of its
shape. Autocast's weight-cast cache is disabled while capturing, so casts are part of the graph instead of
reading tensors that die when the caller's autocast region ends. Moving or replacing parameters changes their
storage, and so does changing them in place (``load_state_dict``, an optimizer step: their version counters
move): the next call's check sees it and that call recaptures. The replay could not see such changes by itself
when a patch below keeps derived copies of the weights (``bf16_weights``). Not seen: replacing a module that holds
no parameter or buffer (an activation) or changing a plain attribute; revert and re-apply the patches after such
an edit.

When the graph path does not apply the upstream forward runs eagerly and the reason is logged once per model:
CPU tensors, training mode, autograd enabled, more than ``cuda_graph_max_frames`` frames (long sequences are
GPU-bound and a graph would only pin their memory), ``query_points`` given (the track head's point count
varies), or a ``sequence_parallel`` call that exchanges tensors between ranks. A capture that fails is logged
and that signature stays eager until the parameters change.

Exact: the graph replays the same kernels on the same data.
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ...config import TurboConfig
from ...distributed import communicating
from ...upstream import AGGREGATOR_FORWARD, VGGT_FORWARD
from .._base import Patch, Target, Tier

log = logging.getLogger(__name__)

MAX_GRAPHS = 2
WARMUP_RUNS = 2


@dataclass
class _Entry:
    graph: Optional["torch.cuda.CUDAGraph"]  # None: capture failed, stay eager
    static_images: Optional[torch.Tensor] = None
    static_out: Any = None
    storage: int = 0  # storage_signature at capture
    held: tuple = ()  # the parameters' and buffers' storage at capture, alive while the graph may read it


def _autocast_state() -> tuple[bool, torch.dtype]:
    try:
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(v) for v in out)
    return out


_VERSION = operator.attrgetter("_version")


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model``: a flat walk of the module tree (a module reached twice, shared or
    in a cycle, is read once, as ``parameters()`` does)."""
    modules = [model]
    seen = {id(model)}
    for module in modules:  # breadth first: the list grows while it is read
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                modules.append(child)
    return [t for m in modules for group in (m._parameters, m._buffers) for t in group.values() if t is not None]


def storage_signature(model: nn.Module) -> int:
    """A hash of the address and in-place version of every parameter and buffer of ``model``.

    Why not ``model.parameters()``: the signature is computed on every call, and for the full VGGT (1,400 tensors
    in 1,600 modules) its named-module generators take about twice as long as this flat walk and C-level ``map``
    calls, time a call now spends while the GPU replays the graph.
    """
    tensors = _tensors(model)
    try:
        versions = tuple(map(_VERSION, tensors))
    except RuntimeError:  # an inference tensor has no version counter (and cannot change in place)
        versions = tuple(t._version if not t.is_inference() else -1 for t in tensors)
    return hash((tuple(map(torch.Tensor.data_ptr, tensors)), versions))


class GraphCache:
    """The captured graphs of one model (least recently used first)."""

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self.entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self.reported: set[str] = set()

    def eager_reason(self, model: nn.Module, images: torch.Tensor, query_points: Any) -> Optional[str]:
        if not images.is_cuda:
            return "input is not on a CUDA device"
        if communicating():
            return "a sequence_parallel call (a graph cannot hold the other ranks' side of its collectives)"
        if model.training:
            return "model is in training mode"
        if torch.is_grad_enabled():
            return "autograd is enabled (call under torch.no_grad() or torch.inference_mode())"
        if query_points is not None:
            return "query_points given (the track head runs eagerly)"
        frames = images.shape[1] if images.dim() == 5 else images.shape[0]
        if frames > self.max_frames:
            return f"{frames} frames > cuda_graph_max_frames={self.max_frames} (GPU-bound; a graph would pin memory)"
        return None

    def report(self, reason: str) -> None:
        if reason not in self.reported:
            self.reported.add(reason)
            log.info("vggt_turbo cuda_graphs: running eagerly: %s", reason)

    def key(self, images: torch.Tensor) -> tuple:
        # inference mode is part of the key: buffers captured under it are inference tensors, which a later call
        # under plain no_grad could not copy into.
        mode = torch.is_inference_mode_enabled()
        return (tuple(images.shape), images.dtype, images.device, _autocast_state(), mode)

    def capture(self, wrapped: Any, model: nn.Module, images: torch.Tensor, kwargs: dict, storage: int) -> _Entry:
        held = tuple(t.detach() for t in _tensors(model))  # new tensors on the same storage: it outlives .data swaps
        enabled, dtype = _autocast_state()
        static_images = images.clone()
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        wrapped(static_images, **kwargs)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = wrapped(static_images, **kwargs)
        except RuntimeError as err:
            log.warning("vggt_turbo cuda_graphs: capture failed for %s, running eagerly: %s", tuple(images.shape), err)
            return _Entry(graph=None, storage=storage)
        return _Entry(graph, static_images, static_out, storage, held)

    def add(self, key: tuple, entry: _Entry) -> _Entry:
        self.entries.pop(key, None)  # a failed capture of this key, tried again after a parameter change
        while len(self.entries) >= MAX_GRAPHS:
            self.entries.popitem(last=False)
        self.entries[key] = entry
        return entry

    def drop_all(self) -> None:
        """Forget every graph (the parameters changed), once a replay in flight has finished reading them. Every
        kept graph thus holds the current parameters' storage, or storage kept alive by its ``held``: a patch
        that rebuilds derived tensors (``bf16_weights``' copies) does so only inside a call, which first drops
        the graphs that read the old ones."""
        torch.cuda.current_stream().synchronize()
        self.entries.clear()


def _outputs(entry: _Entry, images: torch.Tensor) -> Any:
    out = _clone(entry.static_out)
    if isinstance(out, dict) and "images" in out:  # upstream returns the caller's images, not a copy
        out["images"] = images.unsqueeze(0) if images.dim() == 4 else images
    return out


def make_wrapper(max_frames: int):
    """The forward wrapper; graph caches are per model instance (weakly held, dropped on revert)."""
    caches: "weakref.WeakKeyDictionary[nn.Module, GraphCache]" = weakref.WeakKeyDictionary()

    def forward(wrapped: Any, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        images, query_points = VGGT_FORWARD.bind(*args, **kwargs)  # also binds an Aggregator's forward(images)
        cache = caches.get(model)
        if cache is None:
            cache = caches[model] = GraphCache(max_frames)
        reason = cache.eager_reason(model, images, query_points)
        if reason is not None:
            cache.report(reason)
            return wrapped(*args, **kwargs)
        key = cache.key(images)
        entry = cache.entries.get(key)
        if entry is not None and entry.graph is not None:
            entry.static_images.copy_(images)
            entry.graph.replay()  # first: the storage check below runs on the host while the GPU replays
            if storage_signature(model) == entry.storage:
                cache.entries.move_to_end(key)
                return _outputs(entry, images)
            cache.drop_all()  # the parameters changed: that replay read the old ones; capture anew
            entry = None
        storage = storage_signature(model)
        if entry is None or entry.storage != storage:
            if any(other.storage != storage for other in cache.entries.values()):
                cache.drop_all()  # graphs of other shapes captured with the old parameters: stale for good
            entry = cache.add(key, cache.capture(wrapped, model, images, {}, storage))
        cache.entries.move_to_end(key)
        if entry.graph is None:
            return wrapped(*args, **kwargs)
        entry.static_images.copy_(images)
        entry.graph.replay()
        return _outputs(entry, images)

    forward.graph_caches = caches  # type: ignore[attr-defined]
    return forward


def graph_cache(model: nn.Module) -> Optional[GraphCache]:
    """The graphs captured for ``model`` so far (None when cuda_graphs is not applied or nothing ran yet)."""
    wrapper = model.__dict__.get("forward")
    while wrapper is not None:
        caches = getattr(getattr(wrapper, "_self_wrapper", None), "graph_caches", None)
        if caches is not None:
            return caches.get(model)
        wrapper = getattr(wrapper, "__wrapped__", None)
    return None


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target("", "forward", make_wrapper(config.cuda_graph_max_frames))]


PATCH = Patch(
    name="cuda_graphs",
    tier=Tier.EXACT,
    sequence_parallel=True,  # calls that communicate run eagerly
    # a CUDA graph cannot capture a host sync or a host-to-device copy
    requires=("sync_free_rope", "cached_positions"),
    summary=(
        "the forward captured per input shape and replayed (inference, no `query_points`); parameters checked"
        " on every call, recaptured when they change"
    ),
    options={"cuda_graph_max_frames": "longest sequence captured (16); longer ones run eagerly"},
    requirements=(AGGREGATOR_FORWARD.requirement, VGGT_FORWARD.requirement),
    enabled=lambda c: c.cuda_graphs,
    targets=_targets,
)
