"""One module per optimization, grouped by where it acts: ``aggregator/`` (the frame and global blocks),
``patch_embed/``, ``heads/``, ``runtime/`` (the whole forward: graphs, offloading, sequence parallelism, NVTX) and
``approximate/`` (the approximations). Modules starting with ``_`` are shared helpers, not patches. ``ALL_PATCHES``
is the order in which wrappers are stacked (last = outermost)."""

from typing import Mapping

from ..config import TurboConfig
from . import _rules
from ._base import Patch, Target, Tier
from .aggregator.bf16_weights import PATCH as BF16_WEIGHTS
from .aggregator.cached_casts import PATCH as CACHED_CASTS
from .aggregator.cached_positions import PATCH as CACHED_POSITIONS
from .heads.camera_head_matmul import PATCH as CAMERA_HEAD_MATMUL
from .aggregator.chunked_mlp import PATCH as CHUNKED_MLP
from .patch_embed.chunked_patch_embed import PATCH as CHUNKED_PATCH_EMBED
from .aggregator.compile_blocks import PATCH as COMPILE
from .heads.concurrent_heads import PATCH as CONCURRENT_HEADS
from .runtime.cuda_graphs import PATCH as CUDA_GRAPHS
from .patch_embed.dino_attention import PATCH as DINO_ATTENTION
from .heads.dpt_channels_last import PATCH as DPT_CHANNELS_LAST
from .heads.dpt_channels_last_weights import PATCH as DPT_CHANNELS_LAST_WEIGHTS
from .heads.fused_dpt_epilogue import PATCH as FUSED_DPT_EPILOGUE
from .heads.fused_dpt_upsample import PATCH as FUSED_DPT_UPSAMPLE
from .aggregator.fused_frame_batching import PATCH as FUSED_FRAME_BATCHING
from .aggregator.fused_layer_scale import PATCH as FUSED_LAYER_SCALE
from .aggregator.fused_qk_norm_rope import PATCH as FUSED_QK_NORM_ROPE
from .approximate.global_to_frame import PATCH as GLOBAL_TO_FRAME
from .approximate.kv_subsample import PATCH as KV_SUBSAMPLE
from .runtime.nvtx_ranges import PATCH as NVTX
from .runtime.offload_intermediates import PATCH as OFFLOAD_INTERMEDIATES
from .patch_embed.patch_embed_matmul import PATCH as PATCH_EMBED_MATMUL
from .aggregator.sdpa import PATCH as SDPA
from .runtime.sequence_parallel import PATCH as SEQUENCE_PARALLEL
from .heads.single_key_attention import PATCH as SINGLE_KEY_ATTENTION
from .aggregator.sync_free_rope import PATCH as SYNC_FREE_ROPE

ALL_PATCHES: tuple[Patch, ...] = (
    PATCH_EMBED_MATMUL,  # innermost on the patch projection: the wrappers of a "conv" patch embed run around it
    FUSED_DPT_UPSAMPLE,  # replaces DPTHead._forward_impl without calling upstream's: below the head-input wrappers
    FUSED_DPT_EPILOGUE,  # the heads' residual units and convolutions
    DPT_CHANNELS_LAST,  # above fused_dpt_epilogue: hands its projects convolutions a restrided view
    DPT_CHANNELS_LAST_WEIGHTS,  # around the whole head's forward: every convolution in it sees the copies
    CACHED_POSITIONS,  # replaces Aggregator.forward without calling upstream's: must sit below sync_free_rope
    SYNC_FREE_ROPE,
    CACHED_CASTS,  # below bf16_weights, which turns autocast off inside it (then these copies are not used)
    BF16_WEIGHTS,  # above the Aggregator.forward wrappers it runs in bf16
    CHUNKED_PATCH_EMBED,  # above bf16_weights' patch_embed wrapper: each slice is cast to bf16 on its own
    OFFLOAD_INTERMEDIATES,
    SDPA,
    DINO_ATTENTION,  # the patch embed's attention: the kernel choice sdpa makes for the aggregator's blocks
    CAMERA_HEAD_MATMUL,  # the camera head's linear layers, inside single_key_attention's value-row product
    SINGLE_KEY_ATTENTION,  # the camera head's trunk attention; below concurrent_heads (runs on its stream)
    FUSED_QK_NORM_ROPE,  # above sdpa: computes the attention itself (sdpa_backend), falls back to sdpa's wrapper
    FUSED_FRAME_BATCHING,
    GLOBAL_TO_FRAME,
    KV_SUBSAMPLE,  # above sdpa and fused_qk_norm_rope: computes its global layers' attention itself
    CHUNKED_MLP,  # below fused_layer_scale, which slices long sequences itself; serves the calls it leaves
    FUSED_LAYER_SCALE,
    COMPILE,  # above chunked_mlp: long sequences fall through to it; compiles upstream's Block.forward otherwise
    NVTX,
    CONCURRENT_HEADS,  # outermost on the heads (all of a head on its stream); below cuda_graphs (captured)
    CUDA_GRAPHS,  # captures everything below it
    SEQUENCE_PARALLEL,  # outermost: splits frames before anything runs; its attention replaces sdpa's on global blocks
)



def config_tier(config: TurboConfig) -> Tier:
    """The loosest tier among the patches ``config`` enables (``Tier.EXACT`` when none is enabled)."""
    return max((p.tier for p in ALL_PATCHES if p.enabled(config)), default=Tier.EXACT)


def patch_tiers() -> dict[str, Tier]:
    """Each patch's tier, by patch name (which is its flag's name)."""
    return {p.name: p.tier for p in ALL_PATCHES}


def flag_requirements() -> Mapping[str, tuple[str, ...]]:
    """Flag -> the flags it needs on, as the patches declare them (``_rules.requirements``)."""
    return _rules.requirements(ALL_PATCHES)


def check(config: TurboConfig) -> None:
    """``ValueError`` naming the call that works when ``config`` breaks a rule between flags (``_rules.check``)."""
    _rules.check(config, ALL_PATCHES)


def switched_off(config: TurboConfig, *flags: str) -> TurboConfig:
    """``config`` with ``flags`` off and every flag that needs one of them (``_rules.switched_off``)."""
    return _rules.switched_off(config, ALL_PATCHES, *flags)


__all__ = ["ALL_PATCHES", "Patch", "Target", "Tier", "check", "config_tier", "flag_requirements", "patch_tiers",
           "switched_off"]
