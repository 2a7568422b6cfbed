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
# keep subsampled global attention. Stride 2 (a quarter of the keys), the preset until 2026-11-24, fell short of
# the speed targets; both strides' speed and error are in benchmarks/results (fidelity.json: fast and fast_kv2).
# Pass kv_subsample=2 for the milder setting.
FAST_KV_SUBSAMPLE = 4


@dataclass(frozen=True)
class TurboConfig:
    """Which optimizations to apply, one field per flag; each flag's patch module (``patches/<name>.py``) says why
    it is faster and why it keeps its tier, and ``python -m vggt_turbo.flag_table`` lists them with their tiers.

    Attributes:
        fused_frame_batching: each frame-attention step as one call over all B*S frames (exact).
        sdpa: ``Attention.forward`` with contiguous q/k/v and the SDPA backend ``sdpa_backend`` (exact).
        sdpa_backend: ``"auto"`` (torch's choice, after FlashAttention-4 when that flag is on) or a forced backend.
        sync_free_rope: RoPE-2D without upstream's per-call device-to-host sync, tables in fp32 (exact).
        global_to_frame_layers: global blocks run as frame attention (APPROXIMATION; empty in ``"exact"``).
        nvtx: NVTX ranges around the patch embed, every block and head, for Nsight Systems (exact; off).
        cached_positions: RoPE positions built once per shape on the device (exact).
        cuda_graphs: the forward captured in a CUDA graph per input shape and replayed (exact; CUDA inference).
        cuda_graph_max_frames: longest sequence captured; longer ones are GPU-bound and run eagerly.
        bf16_weights: the aggregator natively in bf16 under bf16 autocast (REDUCED PRECISION; on in ``"fast"``).
        cached_casts: autocast's bf16 copies of the aggregator's weights kept between calls (exact, bit for bit).
        chunked_mlp: long sequences' MLP over 32,768-token slices, so its wide activation stays small (exact).
        chunked_patch_embed: the DINOv2 patch embed over slices of frames (exact).
        compile: ``torch.compile`` of each aggregator block on CUDA (exact to fused rounding; off: compiles first).
        offload_intermediates: the heads' kept layers in pinned host memory (exact); ``"auto"``: from 32 frames.
        fused_qk_norm_rope: qk-norm and RoPE-2D in one kernel, fp32 in registers (exact; needs sync_free_rope).
        flash_attention_4: FlashAttention-4 for the aggregator's attention where the package runs the call (exact).
        fused_dpt_upsample: the DPT heads' bilinear resizes in one Triton kernel each (exact, fp32 bit for bit).
        fused_dpt_epilogue: each DPT convolution's bias with its ReLU or residual add in one pass (bit for bit).
        dpt_channels_last: the DPT heads' feature maps channels-last at one frame, as from two frames on (exact).
        dpt_channels_last_weights: channels-last copies of the DPT heads' k x k weights kept between calls (exact).
        concurrent_heads: the three heads on CUDA streams of their own at one frame (exact, bit for bit).
        fused_layer_scale: each block's LayerScale product and residual sum in one pass (exact, bit for bit).
        fused_add_norm: with fused_layer_scale, each residual sum and the next LayerNorm in one pass (exact).
        dino_attention: the patch embed's attention on FlashAttention-4 or the forced backend (exact).
        single_key_attention: the camera head's one-token attention as its value rows (exact to fp32 rounding).
        camera_head_matmul: the camera head's fp32 products of 8-100 rows as W x^T, another cuBLAS kernel (exact).
        patch_embed_matmul: the 14 x 14 patch projection as one matrix product on cuBLAS (exact).
        sequence_parallel: frames split over a torch.distributed group's ranks (exact; False, True or a group).
        sequence_parallel_output: ``"gathered"`` (every rank gets every frame) or ``"sharded"`` (its own frames).
        kv_subsample: r >= 2: global attention's keys/values every r patch rows and columns (APPROXIMATION; 1: off).
        kv_subsample_layers: the global layers ``kv_subsample`` applies to; empty: all not run as frame attention.
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
    dpt_channels_last_weights: bool = True
    concurrent_heads: bool = True
    fused_layer_scale: bool = True
    fused_add_norm: bool = True
    dino_attention: bool = True
    single_key_attention: bool = True
    camera_head_matmul: bool = True
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
