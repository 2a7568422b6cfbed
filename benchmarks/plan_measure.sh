#!/usr/bin/env bash
# The planner's missing calibration rows (#21) on one H200, in two calls of at most 10 minutes each:
#   bash benchmarks/plan_measure.sh 1   # 518x392 at 1, 10, 32, 100, 200 frames: upstream, exact, exact without
#                                       # offloading, fast (3 timed calls per row)
#   bash benchmarks/plan_measure.sh 2   # 518x392 at 400 and 800 frames in one process: fast vs upstream (issue
#                                       # item 4; 1 timed call per row, no fp32 reference: it alone would take minutes)
# Each call stops starting rows at 550 s (--deadline: what would end later is skipped and listed in the JSON's
# meta.skipped_for_deadline). Results go to
# ${OUT:-benchmarks/results}/plan-518x392-<part>/<gpu>/latest.json; copy them to benchmarks/results/<gpu>/ under a
# dated name and add them to SOURCES in benchmarks/plan_calibration.py.
# Run from the repository root: this tree's vggt_turbo (src/) is the one measured.
set -euo pipefail
part=${1:?usage: plan_measure.sh 1|2}
out=${OUT:-benchmarks/results}/plan-518x392-$part
case $part in
  1) frames=1,10,32,100,200; variants=upstream,exact,exact-offload_intermediates,fast; timed=(--warmup 1 --repeats 3) ;;
  2) frames=400,800; variants=fast,upstream; timed=(--warmup 1 --repeats 1 --no-reference) ;;
  *) echo "usage: plan_measure.sh 1|2" >&2; exit 2 ;;
esac
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} timeout 590 python -m vggt_turbo.bench --image-size 518x392 --frames "$frames" --variants "$variants" "${timed[@]}" \
  --phases off --deadline 550 --no-progress --out "$out"
