#!/usr/bin/env python
"""Benchmark upstream VGGT vs vggt-turbo (same entry point as ``vggt-turbo bench``; see benchmarks/README.md).

    python benchmarks/bench.py                        # defaults: full model on CUDA, small model on the CPU
    python benchmarks/bench.py --frames 1,2 --repeats 1
"""

import sys

from vggt_turbo.bench import main

if __name__ == "__main__":
    sys.exit(main())
