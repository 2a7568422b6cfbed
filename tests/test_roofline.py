"""benchmarks/roofline.py: its FLOP split matches the closed forms of VGGT's layers (so that every floor it
prints charges the right work), and it picks the fastest measured attention kernel per shape."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roofline():
    spec = importlib.util.spec_from_file_location("roofline", ROOT / "benchmarks" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_split_matches_closed_forms(roofline) -> None:
    P, C, depth = 1374, 1024, 24  # tokens per 518 px frame, width, blocks per stack (DINOv2, frame, global)
    linear = 2 * P * 12 * C * C  # qkv 3C^2 + proj C^2 + MLP 8C^2, per token and block, 2 FLOPs per multiply-add
    attention = 4 * P * P * C  # q k^T and p v over all heads
    patch_conv = 2 * 3 * 14 * 14 * C * (P - 5)  # the 14 px patch convolution, one output per patch
    counts = roofline.count_flops([1, 2])
    for frames, got in counts.items():
        assert got["matmul_bf16"] == 3 * depth * linear * frames + patch_conv * frames
        assert got["attention_frame"] == 2 * depth * attention * frames
        assert got["attention_global"] == depth * attention * frames * frames  # one sequence of frames * P tokens
    assert counts[2]["heads_conv_tf32"] == 2 * counts[1]["heads_conv_tf32"] > 0


def test_attention_rates_take_the_fastest_kernel_per_shape(roofline, tmp_path) -> None:
    flops = 4.0 * 2 * 100 * 100 * 64 * 16
    rows = [
        {"shape": "frame 2", "kernel": "cudnn", "B": 2, "N": 100, "K": 100, "ms": 2.0},
        {"shape": "frame 2", "kernel": "fa4", "B": 2, "N": 100, "K": 100, "ms": 4.0, "ms_graph": 1.0},
        {"shape": "frame 2", "kernel": "math", "B": 2, "N": 100, "K": 100, "ms": 0.1},  # not a fused kernel: ignored
        {"shape": "frame 2", "kernel": "fa4+lse", "B": 2, "N": 100, "K": 100, "ms": 0.1},  # another problem
        {"shape": "global 20", "kernel": "cudnn", "B": 1, "N": 200, "K": 200, "ms": 1.0},
    ]
    path = tmp_path / "attention_backends.json"
    path.write_text(json.dumps({"rows": rows}))
    rates = roofline.attention_rates(path)
    assert rates["frame 2"] == pytest.approx(flops / 1e-3 / 1e12)  # the graph replay of fa4
    assert roofline.nearest(rates, "frame", 7) == rates["frame 2"]
    assert roofline.nearest(rates, "global", 1) == rates["frame 2"]  # one frame: global attention is frame-shaped
    assert roofline.nearest(rates, "global", 100) == rates["global 20"]
