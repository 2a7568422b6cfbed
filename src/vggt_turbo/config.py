"""The typed configuration: one field per optimization, validated before anything is patched.

Presets:
  - ``"exact"`` (default): every patch of the exact tier (``patches._base.Tier``: upstream's operations, at most
    another summation order or fewer roundings than autocast) that was measured faster or leaner.
    ``fused_frame_batching`` and ``sdpa`` are exact but measured no gain on an H100 with torch 2.11
    (benchmarks/results), so they are off by default and stay available for ablations.
  - ``"fast"``: ``"exact"`` plus the reduced-precision ``bf16_weights`` and the approximations: early global layers
    run as frame attention, the others attend to subsampled keys/values (``kv_subsample``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Union

from .process_group import describe_group, is_process_group

if TYPE_CHECKING:
    from .patches._base import Tier

# Boolean flags that also take "auto": the patch is applied and decides per call (see the field's docstring).
AUTO = "auto"
AUTO_FLAGS = frozenset({"offload_intermediates"})

SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fa4")
# What each rank gets back under sequence_parallel (see the field's docstring).
SEQUENCE_PARALLEL_OUTPUTS = ("gathered", "sharded")

# Layers that the "fast" preset runs as frame attention. The first five global layers were swapped by the
# project's seed; AVGGT (arXiv 2512.02541) reports early global layers attend mostly within a frame.
FAST_GLOBAL_TO_FRAME_LAYERS = (0, 1, 2, 3, 4)
# Grid stride of the "fast" preset's K/V subsampling in the other global layers: every 4th patch row and column
# (100 of a frame's 1369 patch keys, plus its 5 special tokens). AVGGT's recommended setting, as reported, is a grid
# stride of 4 after converting 9 early layers; the preset converts 5 and takes the stride per axis, so 19 layers
# keep subsampled global attention. Stride 2 (a quarter of the keys), the preset until 2026-11-24, reached 2.4x at
# 100 frames and 2.8x at 200 on an H100, short of the 3x / 4x targets; its error, and stride 4's, on the same inputs
# are in benchmarks/results (fidelity.json: fast and fast_kv2). Pass kv_subsample=2 for the milder setting.
FAST_KV_SUBSAMPLE = 4


@dataclass(frozen=True)
class TurboConfig:
    """Which optimizations to apply. Every field is independent so that each can be ablated.

    Attributes:
        fused_frame_batching: run each frame-attention step as one call over all B*S frames on a contiguous
            (B*S, P, C) layout (exact).
        sdpa: replace ``Attention.forward`` by a version with contiguous q/k/v and an explicit SDPA backend (exact
            up to the chosen kernel's rounding).
        sdpa_backend: ``"auto"`` (torch's choice: cuDNN first on an H100, after FlashAttention-4 when
            ``flash_attention_4`` is on), or force one of ``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``,
            ``"fa4"`` (FlashAttention-4). Only used when ``sdpa`` is on; a forced backend also runs the patch
            embed's attention when ``dino_attention`` is on.
        sync_free_rope: RoPE-2D without upstream's per-call ``int(positions.max())`` device-to-host sync (exact).
        global_to_frame_layers: indices of global blocks that run as frame attention. APPROXIMATION: changes
            outputs, off (empty) in ``"exact"``.
        nvtx: NVTX ranges around patch embed, every block and every head, for Nsight Systems (exact; off by
            default because each range costs a few microseconds of host time).
        cached_positions: build RoPE positions once per shape on the device instead of a CPU tensor copied to
            the GPU in every forward (exact).
        cuda_graphs: capture the forward in a CUDA graph per input shape and replay it (exact; needs
            ``sync_free_rope`` and ``cached_positions``; eager on CPU, in training or with autograd on).
        cuda_graph_max_frames: longest sequence (frames) captured; longer ones run eagerly, being GPU-bound. 16:
            at 10 frames a graph measured 142.4 vs 147.8 ms eager on an H100 (the eager call left the GPU idle for
            5.6 ms between kernels, waiting for the host's launches), for the same memory reserved; 16 frames 253.4
            vs 259.9 ms.
        bf16_weights: under bf16 autocast, run the aggregator natively in bf16 from a bf16 copy of its weights
            (residual stream, norms and RoPE in bf16) and hand the heads their fp32 inputs; the heads keep upstream's
            fp32. REDUCED PRECISION: rounds more often than upstream-autocast (its error against fp32 is in
            ``precision.md``); off in ``"exact"``, on in ``"fast"``; no effect without bf16 autocast.
        cached_casts: under autocast, keep the bf16 (or fp16) copies of the aggregator's linear and convolution
            weights between calls instead of letting autocast cast them again in every forward (exact, bit for
            bit; the copies stay allocated between calls).
        chunked_mlp: run the frame and global blocks' MLP over slices of tokens, so its 4x-wide hidden activation never
            exists for the whole sequence at once (exact; only long sequences are sliced).
        chunked_patch_embed: run the patch embed (DINOv2 ViT-L) over slices of frames, so its activations never exist
            for the whole sequence at once (exact: frames are embedded independently; only calls of more than
            ``patches.chunked_patch_embed.CHUNK_FRAMES`` frames are sliced).
        compile: ``torch.compile`` each aggregator block on CUDA (exact to the fused kernels' rounding). Off by
            default: the first call per input shape compiles for tens of seconds.
        offload_intermediates: move the layer outputs the heads read to pinned host memory as soon as they exist
            and bring back each head's chunk of frames just before it runs (exact; CUDA, whole VGGT only). ``True``,
            ``False`` or ``"auto"`` (default): it trades PCIe transfers (a few % of the time) for the largest block
            of long-sequence memory, so ``"auto"`` offloads only calls of at least
            ``patches.offload_intermediates.OFFLOAD_AUTO_FRAMES`` frames (B*S; under ``sequence_parallel``, the
            rank's own) and runs as ``False`` below that.
        fused_qk_norm_rope: qk-norm and RoPE-2D of every block's attention in one kernel (Triton on CUDA) writing
            q and k in place into the qkv projection's output (exact: upstream's fp32 arithmetic, rounded once to
            the attention dtype; needs ``sync_free_rope``; a PyTorch path with upstream's arithmetic elsewhere).
        flash_attention_4: run the aggregator's attention on FlashAttention-4 (the optional ``flash-attn-4``
            package, CuTe-DSL kernels for Hopper and Blackwell) where it is installed and runs the call (CUDA, bf16
            or fp16, inference); elsewhere torch's kernels (exact to bf16 rounding; on by default, a no-op without
            the package). Applies to the attention that the other patches compute (``fused_qk_norm_rope``,
            ``sdpa``, ``kv_subsample``, ``sequence_parallel``); the patch embed's attention has its own flag,
            ``dino_attention``.
        fused_dpt_upsample: the DPT heads' (depth, points, track features) bilinear resizes in one Triton kernel
            each, the last one adding the positional embedding in the same pass, and their positional embeddings
            built once per shape instead of in every call (exact: fp32 to the last bit; CUDA with triton, else
            PyTorch's resize with the cached embeddings, equal to upstream).
        fused_dpt_epilogue: in the DPT heads, each convolution's bias added together with the ReLU or residual add
            that follows it, in one pass instead of two or three (exact, bit for bit; Triton on CUDA, PyTorch
            elsewhere).
        dpt_channels_last: give the DPT heads' first feature maps canonical channels-last strides (a view, no copy),
            so that with one frame the heads run channels-last as upstream runs them for two or more frames, without
            cuDNN's NCHW/NHWC transposes (exact to TF32 rounding: other cuDNN kernels at one frame; no change from
            two frames on).
        concurrent_heads: run the camera, depth and point heads on CUDA streams of their own, so that their small
            kernels overlap, for calls of at most ``patches.concurrent_heads.MAX_FRAMES`` frames (1: the heads'
            memory then coexists; exact, bit for bit: the same kernels; CUDA inference only; not with
            ``offload_intermediates=True``).
        fused_layer_scale: every block's LayerScale product and residual sum (frame, global and DINOv2 blocks) in
            one pass instead of two (exact, bit for bit; Triton on CUDA, PyTorch elsewhere; sequences that
            ``chunked_mlp`` slices keep PyTorch's sums).
        fused_add_norm: with ``fused_layer_scale``, each residual sum and the LayerNorm that reads it next in one
            kernel pass: a block's first sum and its ``norm2``, its output and the next block's ``norm1`` (exact:
            the norm's fp32 sums in another order; under autocast the fp32 sum is kept and the norm is written
            in the autocast dtype that the next matmul casts it to; needs ``fused_layer_scale``).
        dino_attention: the patch embed's (DINOv2) attention on FlashAttention-4 where the package runs the call,
            as ``flash_attention_4`` does for the frame and global blocks, or on the backend ``sdpa`` forces;
            elsewhere torch's kernel on upstream's q, k, v (exact to bf16 rounding; bit for bit where torch's
            kernel runs).
        single_key_attention: the camera head's trunk attention, when it has one token per sequence (one frame):
            softmax over a single key is exactly 1, so only the value rows of the qkv projection are computed and
            the attention kernel is skipped (exact to fp32 rounding: that product's accumulation order, and torch's
            fp32 CUDA kernel itself returns v only within 1e-6; CUDA and CPU, inference).
        patch_embed_matmul: the patch projection (a 14 x 14 convolution with stride 14) as one matrix product over
            the image's patches, on cuBLAS instead of cuDNN's generic convolution kernel (exact to the output
            dtype's rounding: the same products summed in another order; inference).
        sequence_parallel: split each sequence's frames over the ranks of a torch.distributed process group
            (``True``: the default group, or a ``ProcessGroup``); every rank calls the model with the same images
            (exact; inference only; see ``patches/sequence_parallel.py``). Off (``False``) by default.
        sequence_parallel_output: ``"gathered"`` (default): every rank gets every frame's predictions, as
            upstream returns them; ``"sharded"``: each rank gets its own frames' only
            (``vggt_turbo.distributed.Shard``).
        kv_subsample: r >= 2: global attention's keys/values are every frame's special tokens and its patch tokens
            every r rows and columns, plus each query's own key and the dropped keys' mean (AVGGT; see
            ``patches/kv_subsample.py``). APPROXIMATION: changes outputs; 1 (default) is off.
        kv_subsample_layers: the global layers ``kv_subsample`` applies to; empty (default): every global layer not
            in ``global_to_frame_layers``. Needs ``kv_subsample`` >= 2; a layer cannot be in both lists.
    """

    fused_frame_batching: bool = False
    sdpa: bool = False
    sdpa_backend: str = "auto"
    sync_free_rope: bool = True
    global_to_frame_layers: tuple[int, ...] = ()
    nvtx: bool = False
    cached_positions: bool = True
    cuda_graphs: bool = True
    cuda_graph_max_frames: int = 16
    bf16_weights: bool = False
    cached_casts: bool = True
    chunked_mlp: bool = True
    chunked_patch_embed: bool = True
    compile: bool = False
    offload_intermediates: Union[bool, str] = AUTO  # True, False or "auto" (AUTO_FLAGS)
    fused_qk_norm_rope: bool = True
    flash_attention_4: bool = True
    fused_dpt_upsample: bool = True
    fused_dpt_epilogue: bool = True
    dpt_channels_last: bool = True
    concurrent_heads: bool = True
    fused_layer_scale: bool = True
    fused_add_norm: bool = True
    dino_attention: bool = True
    single_key_attention: bool = True
    patch_embed_matmul: bool = True
    sequence_parallel: Any = False  # False, True (the default process group) or a torch.distributed.ProcessGroup
    sequence_parallel_output: str = "gathered"
    kv_subsample: int = 1
    kv_subsample_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise TypeError(f"TurboConfig.{f.name} must be a bool, got {value!r}")
            if f.name in AUTO_FLAGS and not (isinstance(value, bool) or (isinstance(value, str) and value == AUTO)):
                raise TypeError(f"TurboConfig.{f.name} must be True, False or {AUTO!r}, got {value!r}")
        if not isinstance(self.sdpa_backend, str) or self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"TurboConfig.sdpa_backend must be one of {SDPA_BACKENDS}, got {self.sdpa_backend!r}")
        for name in ("global_to_frame_layers", "kv_subsample_layers"):
            object.__setattr__(self, name, _layer_tuple(getattr(self, name), name))
        _check_kv_subsample(self.kv_subsample, self.kv_subsample_layers, self.global_to_frame_layers)
        if isinstance(self.cuda_graph_max_frames, bool) or not isinstance(self.cuda_graph_max_frames, int):
            raise TypeError(f"TurboConfig.cuda_graph_max_frames must be an int, got {self.cuda_graph_max_frames!r}")
        if self.cuda_graph_max_frames < 1:
            raise ValueError(f"TurboConfig.cuda_graph_max_frames must be >= 1, got {self.cuda_graph_max_frames}")
        _check_sequence_parallel(self.sequence_parallel, self.sequence_parallel_output)

    @property
    def tier(self) -> "Tier":
        """The loosest precision tier among the patches this config enables (``patches._base.Tier``)."""
        from .patches import config_tier  # the patches import this module: their tiers are read here, at call time

        return config_tier(self)

    @property
    def is_exact(self) -> bool:
        """True when every enabled patch is of the exact tier (no reduced precision, no approximation)."""
        tier = self.tier
        return tier is type(tier).EXACT

    def replace(self, **flags: Any) -> "TurboConfig":
        """A copy with some fields changed; unknown names raise ``TypeError``."""
        unknown = sorted(set(flags) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown vggt_turbo flag(s) {unknown}; valid flags: {field_names()}")
        return dataclasses.replace(self, **flags)

    @classmethod
    def preset(cls, name: str) -> "TurboConfig":
        """The named preset (``"exact"`` or ``"fast"``)."""
        try:
            return PRESETS[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain values; a process group becomes a short description, so that the dict serialises."""
        return {f.name: describe_group(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _check_sequence_parallel(value: Any, output: Any) -> None:
    if not isinstance(value, bool) and not is_process_group(value):
        raise TypeError(f"TurboConfig.sequence_parallel must be a bool or a torch.distributed.ProcessGroup, got {value!r}")
    if not isinstance(output, str) or output not in SEQUENCE_PARALLEL_OUTPUTS:
        raise ValueError(f"TurboConfig.sequence_parallel_output must be one of {SEQUENCE_PARALLEL_OUTPUTS}, got {output!r}")


def _layer_tuple(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"TurboConfig.{name} must be a sequence of ints, got {value!r}")
    layers = tuple(value)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"TurboConfig.{name} must hold ints, got {i!r}")
        if i < 0:
            raise ValueError(f"TurboConfig.{name} must be >= 0, got {i}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"TurboConfig.{name} has duplicates: {layers}")
    return tuple(sorted(layers))


def _check_kv_subsample(stride: Any, layers: tuple[int, ...], frame_layers: tuple[int, ...]) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(f"TurboConfig.kv_subsample must be an int (1: off), got {stride!r}")
    if stride < 1:
        raise ValueError(f"TurboConfig.kv_subsample must be >= 1 (1: off), got {stride}")
    if layers and stride == 1:
        raise ValueError(f"TurboConfig.kv_subsample_layers={layers} needs kv_subsample >= 2 (1 keeps every key: off)")
    both = sorted(set(layers) & set(frame_layers))
    if both:
        raise ValueError(
            f"TurboConfig: layers {both} are in both global_to_frame_layers and kv_subsample_layers; a global layer "
            "runs either as frame attention or as subsampled global attention"
        )


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TurboConfig)]


PRESETS: Mapping[str, TurboConfig] = {
    "exact": TurboConfig(),
    "fast": TurboConfig(
        bf16_weights=True, global_to_frame_layers=FAST_GLOBAL_TO_FRAME_LAYERS, kv_subsample=FAST_KV_SUBSAMPLE
    ),
}

ConfigLike = Union[TurboConfig, str, None]


def resolve(config: ConfigLike = None, **flags: Any) -> TurboConfig:
    """Turn ``apply_optimizations``' ``config`` and ``**flags`` into one validated ``TurboConfig``."""
    if config is None:
        base = PRESETS["exact"]
    elif isinstance(config, str):
        base = TurboConfig.preset(config)
    elif isinstance(config, TurboConfig):
        base = config
    else:
        raise TypeError(f"config must be a TurboConfig, a preset name or None, got {type(config).__name__}")
    return base.replace(**flags) if flags else base
