#!/usr/bin/env python
"""Regenerate latest.md and the plots from benchmark JSON, running nothing.

    python benchmarks/report.py                                   # every benchmarks/results/*/latest.json in place
    python benchmarks/report.py benchmarks/results/nvidia-h100-80gb-hbm3/latest.json
    python benchmarks/report.py part1.json part2.json --out benchmarks/results/nvidia-h100-80gb-hbm3
        # merges the parts in order (later rows replace earlier ones with the same variant, frames and part)
        # into <out>/latest.json plus a dated copy, then writes latest.md and the plots there
"""

import argparse
import sys
from pathlib import Path

from vggt_turbo.bench.report import report_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="*", help="benchmark JSON file(s); none: every <results>/*/latest.json")
    parser.add_argument("--out", help="folder for the merged latest.json, md and plots (default: the first JSON's)")
    parser.add_argument("--results", default="benchmarks/results", help="where to look when no JSON is given")
    args = parser.parse_args()
    return report_main(args.json, default_out=Path(args.results), out=args.out)


if __name__ == "__main__":
    sys.exit(main())
