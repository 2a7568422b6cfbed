"""``vggt-turbo bench``: latency, peak memory and fidelity of upstream VGGT, each optimization alone and the presets.

Method (see benchmarks/README.md):
  - one process builds ONE random-init VGGT (no track head) and moves it to the device; every variant runs on
    those weights and on the same seeded inputs, B=1;
  - variants: ``upstream`` (unpatched), each ``TurboConfig`` flag alone (derived from ``dataclasses.fields`` so
    new flags appear by themselves), and the presets ``exact`` and ``fast``; the model is reverted in between;
  - on CUDA everything runs under ``torch.autocast("cuda", dtype=torch.bfloat16)`` as upstream's README does, in
    fp32 on the CPU; ``torch.no_grad()``; TF32 settings are left at torch's defaults;
  - per (variant, frame count): warm-up call(s), then ``--repeats`` timed calls, CUDA events (``perf_counter`` on
    the CPU), median; peak memory = ``max_memory_allocated()`` (reset before each call) minus what was allocated
    when the variant started (weights, inputs);
  - the aggregator's time and peak come from CUDA events / ``max_memory_allocated`` read in forward hooks on
    ``model.aggregator`` *inside* the full-model calls (no separate aggregator runs), except when the whole
    forward replays as one CUDA graph (hooks see nothing): then the aggregator is patched and called alone;
  - fidelity: the first call's outputs of each variant against upstream's from the same inputs,
    ``||a - b|| / ||b||`` in float32 per output, the row keeping the max.

Results go to ``<out>/<device-slug>/latest.json`` (and a dated copy), ``latest.md`` and PNG plots. ``--merge``
merges into an existing ``latest.json`` so a sweep can be split over several commands; ``benchmarks/report.py``
(or ``--report-only``) regenerates the Markdown and plots from JSON files without running anything.

``vggt-turbo fidelity`` (``fidelity_cli``) is the other measuring command: the presets' and approximations' errors
against upstream in fp32 on example scenes, with camera metrics (``fidelity``, whose metrics the bench shares).

matplotlib and tqdm are imported inside functions only: ``import vggt_turbo`` never needs them.
"""

from .cli import add_parser, main

__all__ = ["add_parser", "main"]
