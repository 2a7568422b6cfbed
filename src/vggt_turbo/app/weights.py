"""Build the upstream VGGT that ``reconstruct`` runs: pretrained (Hugging Face or a local checkpoint) or random.

``--weights`` is read as a local path when one exists there (a ``.pt``/``.pth`` state_dict, a ``.safetensors``
file, or a folder written by upstream's ``save_pretrained``), otherwise as a Hugging Face id loaded by upstream's
own ``VGGT.from_pretrained``. ``--random-weights`` needs no download; its results are meaningless and are labelled
so everywhere (see ``reconstruct``).

``size="small"`` is the test-only toy model of ``random_model`` (56x56 images); it accepts random weights or a
state_dict file saved from that model, never a Hugging Face id (that model is full-size).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import UserError
from .hub import pretrained_checkpoint
from .upload import upload
from ..random_model import Size, build_vggt

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "facebook/VGGT-1B"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors")
RANDOM_FOV_BIAS = 0.25  # radians of field of view per camera-head iteration (see _finite_random_cameras_)


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    source: str  # what the weights are, in words, for the summary and report.json


@dataclass
class Plan:
    """The weights a run will use, checked as far as possible without building the model.

    Why a separate step: building the full model takes most of a minute on a CPU, and a checkpoint with the
    wrong shapes, a missing file or a run that will not fit in memory should fail before that, not after.
    ``skeleton`` is the model with parameters on the meta device (no memory, built in a second): it gives the
    expected names and shapes, and the sizes the memory check needs. ``build`` of a checkpoint assigns the weights
    to the skeleton itself, which becomes the model (copying a module tree of this size costs most of a second):
    a plan builds once.
    """

    kind: str  # "random", "file" or "pretrained"
    source: str
    size: Size
    skeleton: nn.Module
    state: Optional[Mapping[str, torch.Tensor]] = None  # "file": the checkpoint, memory-mapped where possible
    path: Optional[Path] = None  # "file": where it is
    pretrained: Optional[tuple[str, str]] = None  # "pretrained": (id or folder, described)
    built: bool = False

    def build(self, device: torch.device | str = "cpu") -> LoadedModel:
        """The upstream VGGT in eval mode on ``device``, with these weights.

        Why not build on the CPU and move: upstream's constructor initialises 1.2 B random parameters on the CPU
        (most of the model phase), only for a checkpoint to overwrite them. A checkpoint is instead assigned to the
        meta-device ``skeleton`` itself (no initialisation at all), its tensors copied from the memory-mapped file
        straight onto ``device`` (``_assign``); random weights are initialised by upstream's own constructor running
        on ``device`` (``torch.device`` as the default device), then ``randomize_`` there, seeded as on the CPU.
        """
        if self.built:
            raise RuntimeError("this Plan has built its model already (a plan builds once)")
        self.built = True
        device = torch.device(device)
        if self.kind == "random":
            # No track head: reconstruct never queries tracks, and it would cost ~0.1 B random parameters.
            with torch.device(device):
                model = build_vggt(self.size, enable_track=False)
            model = model.to(device)  # what the constructor made outside the factory functions (a legacy-built buffer)
            _finite_random_cameras_(model)
        elif self.kind == "file":
            assert self.state is not None
            model = _assign(self.skeleton, self.state, device)
        else:
            assert self.pretrained is not None
            model = _pretrained(self.skeleton, self.size, *self.pretrained, device)
        return LoadedModel(model, self.source)


@torch.no_grad()
def _assign(skeleton: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device) -> nn.Module:
    """``skeleton`` (parameters on the meta device) holding ``state``'s tensors, on ``device``, in eval mode.

    The (memory-mapped) checkpoint's tensors are copied onto ``device`` in the skeleton's dtypes (``upload``: on a
    GPU by several threads at once; on the CPU the map itself, whose pages are read when the forward first touches
    them) and assigned, not copied into initialised parameters. Buffers are not in checkpoints (the skeleton's are
    upstream's own constants) and move to ``device`` with it.
    """
    expected = {name: p.dtype for name, p in skeleton.named_parameters()}
    skeleton.load_state_dict(upload(state, device, expected), strict=True, assign=True)  # checked by plan()
    return skeleton.to(device).eval()


def load_model(weights: str | None, random_weights: bool, size: Size) -> LoadedModel:
    """The upstream VGGT in eval mode on the CPU, with the requested weights (``plan`` then ``build``)."""
    return plan(weights, random_weights, size).build("cpu")


def plan(weights: str | None, random_weights: bool, size: Size) -> Plan:
    """Check the requested weights without building the model; raise ``UserError`` for what will not load.

    A local checkpoint is read (memory-mapped when it is a zip-format ``.pt`` or a safetensors file) and its
    names *and shapes* are compared with upstream's model. A Hugging Face id is only checked when loaded.
    """
    if random_weights:
        return Plan("random", f"RANDOM WEIGHTS ({size} model)", size, _skeleton(size, enable_track=False))
    weights = weights or DEFAULT_WEIGHTS
    path = Path(weights).expanduser()
    if path.is_file():
        state = _read_checkpoint(path)
        has_track = any(k.startswith("track_head.") for k in state)
        skeleton = _skeleton(size, enable_track=has_track)
        _check_shapes(path, state, skeleton, size)
        return Plan("file", str(path), size, skeleton, state=state, path=path)
    if size != "full":
        kinds = "/".join(STATE_DICT_SUFFIXES)
        raise UserError(f"--model-size {size} takes --random-weights or a {kinds} file, not {weights!r}")
    if path.is_dir():
        source = (str(path), f"folder {path}")
    elif path.suffix in STATE_DICT_SUFFIXES or weights.startswith((".", "~", os.sep)):
        raise UserError(f"weights file not found: {weights}")
    else:
        source = (weights, f"Hugging Face id {weights!r}")
    return Plan("pretrained", source[0], size, _skeleton(size, enable_track=False), pretrained=source)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile moves to the meta device as it is created, so that upstream's own
    initialisers (which call ``.item()`` and so cannot run under ``torch.device("meta")``) build a model that
    holds no memory and whose weight initialisation costs nothing."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        with _SkipMetaFills():
            yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class _SkipMetaFills(TorchFunctionMode):
    """Upstream's initialisers' in-place fills of meta parameters, skipped: they have no values to compute, and
    some (``normal_``, ``erfinv_``, ``clamp_``) run torch's Python reference on the meta device, whose first call
    imports torch's compiler stack (``torch._dynamo``: seconds of a one-shot command). Only value fills are
    skipped; shape-changing in-place methods and ``requires_grad_`` run as usual."""

    FILLS = frozenset({"normal_", "uniform_", "erfinv_", "exponential_", "log_normal_", "cauchy_", "geometric_",
                       "bernoulli_", "random_", "fill_", "zero_", "mul_", "add_", "sub_", "div_", "clamp_",
                       "clamp_min_", "clamp_max_", "copy_"})

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init's fills pass it as tensor=
        if getattr(func, "__name__", None) in self.FILLS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def _skeleton(size: Size, enable_track: bool) -> nn.Module:
    with _parameters_on_meta():
        return build_vggt(size, enable_track=enable_track, randomize=False)


def _check_shapes(path: Path, state: Mapping[str, torch.Tensor], skeleton: nn.Module, size: Size) -> None:
    """Raise ``UserError`` unless ``state`` has exactly the model's names with the model's shapes."""
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{path} does not hold upstream VGGT weights ({size} model): {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
        )
    wrong = [f"{k} {tuple(state[k].shape)} instead of {shape}" for k, shape in expected.items()
             if tuple(state[k].shape) != shape]
    if wrong:
        raise UserError(
            f"{path} has upstream VGGT's names but not its shapes ({size} model): {len(wrong)} tensors differ, "
            f"e.g. {'; '.join(wrong[:2])}"
        )


@torch.no_grad()
def _finite_random_cameras_(model: nn.Module) -> None:
    """Give every random camera the same plausible field of view, so that its focal length is finite.

    The camera head's last two outputs are the fields of view, passed through a ReLU after summing the head's
    refinement iterations. With random weights they are often negative, i.e. a field of view of 0 and an
    infinite focal length, which COLMAP (rightly) refuses. With those two output rows' weights zeroed and their
    bias set, every random camera sees ``RANDOM_FOV_BIAS`` per iteration (about 1 rad after upstream's four), and
    the export is exercised as with real weights.
    """
    fc2 = model.camera_head.pose_branch.fc2
    fc2.weight[-2:] = 0.0
    fc2.bias[-2:] = RANDOM_FOV_BIAS


def _pretrained(skeleton: nn.Module, size: Size, source: str, described: str, device: torch.device) -> nn.Module:
    """The model ``VGGT.from_pretrained(source)`` gives, on ``device``: its checkpoint assigned to ``skeleton`` and
    copied onto the device like a local file, where ``hub.pretrained_checkpoint`` finds it (the default weights)
    and its names and shapes are the model's; otherwise ``from_pretrained`` itself (which loads leniently), then
    moved. Like random weights, without the track head (nothing here queries tracks): its weights are left unread."""
    from vggt.models.vggt import VGGT

    with _hub_errors(described):
        checkpoint = pretrained_checkpoint(source)
        state = None
        if checkpoint is not None:
            state = {k: v for k, v in _read_checkpoint(checkpoint).items() if not k.startswith("track_head.")}
            try:
                _check_shapes(checkpoint, state, skeleton, size)
            except UserError as exc:  # from_pretrained loads leniently (strict=False): leave such a file to it
                log.info("%s: loading it through VGGT.from_pretrained instead", exc)
                state = None
        if state is None:
            log.info("loading VGGT.from_pretrained(%r)", source)
            return VGGT.from_pretrained(source).eval().to(device)
    return _assign(skeleton, state, device)


@contextlib.contextmanager
def _hub_errors(described: str) -> Iterator[None]:
    """The Hub's download chatter held back, and its errors turned into one line.

    Offline, huggingface_hub logs a warning for each of its retries (two lines each, two files): two dozen lines
    before its own error. They are kept from the terminal (``-v`` shows them) and the error becomes one line.
    """
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    if not log.isEnabledFor(logging.INFO):
        hub.setLevel(logging.ERROR)
    try:
        yield
    except UserError:  # ours already (an unreadable checkpoint file): one line as it is
        raise
    except Exception as exc:  # huggingface_hub raises its own errors, OSError and HTTP errors for the same cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        action = "download" if described.startswith("Hugging Face") else "load weights from"
        raise UserError(
            f"could not {action} {described} ({type(exc).__name__}: {first[:200]}); if the network is not "
            f"available, pass --weights PATH to a downloaded checkpoint (e.g. {DEFAULT_WEIGHTS}'s model.pt), "
            "or --random-weights to try the pipeline"
        ) from exc
    finally:
        hub.setLevel(level)


def _read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of a checkpoint file, or ``UserError`` in one line naming the file and why.

    torch's own messages are not passed on as they are: for a pickle that is more than tensors it advises
    ``weights_only=False``, which would run the file's code and which this command rightly never does; for an
    empty file it says nothing at all.
    """
    if path.stat().st_size == 0:
        raise UserError(f"cannot read weights file {path}: the file is empty")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol: not the user's concern here
            warnings.simplefilter("ignore")
            state = _read_state_dict(path)
    except UserError:
        raise
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"cannot read weights file {path}: it holds Python objects besides tensors, which are not loaded for "
            "safety; save a plain state_dict (torch.save(model.state_dict(), path)) or a .safetensors file"
        ) from exc
    except Exception as exc:  # torch.load / safetensors raise many types for a corrupt or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(
            f"cannot read weights file {path}: not a PyTorch or safetensors checkpoint ({type(exc).__name__}"
            f"{': ' + first[:200] if first else ''})"
        ) from exc
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"cannot read weights file {path}: it is a dict but not of tensors (not a state_dict)")
    return state


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _map_safetensors(path)
    # mmap (no copy in memory until used) needs torch's zip format; older files are read whole.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    # Upstream's training saves {"model": state_dict, "optimizer": ...}; its released model.pt is the bare dict.
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"cannot read weights file {path}: expected a state_dict, found {type(state).__name__}")
    return state


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one private memory map of it: nothing is read until used.

    Why not ``safetensors.torch.load_file``: it copies every tensor into memory, i.e. reads the whole 5 GB
    checkpoint before the model is built, and ``Plan.build`` then copies it again onto the device. A view of the
    map is read once, by that copy (or on the CPU, by the forward). The map is private (copy-on-write), so
    nothing can write to the file. The layout is safetensors' documented one: an 8-byte little-endian header
    length, a JSON header of dtype, shape and byte offsets, then the data.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if not 0 < header_len <= size - 8:
            raise ValueError(f"safetensors header length {header_len} does not fit in a {size}-byte file")
        header = json.loads(f.read(header_len))
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    base = 8 + header_len
    state: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name}: dtype {info['dtype']} is not supported")
        begin, end = (base + offset for offset in info["data_offsets"])
        item = dtype.itemsize
        count = (end - begin) // item
        if end > size or count != math.prod(info["shape"]):
            raise ValueError(f"tensor {name}: offsets {info['data_offsets']} do not match its shape {info['shape']}")
        if begin % item == 0:
            flat = torch.empty(0, dtype=dtype).set_(storage, begin // item, (count,))
        else:  # unaligned for its dtype (the format does not promise alignment): a copy of its bytes
            flat = torch.empty(0, dtype=torch.uint8).set_(storage, begin, (end - begin,)).clone().view(dtype)
        state[name] = flat.view(info["shape"])
    return state
