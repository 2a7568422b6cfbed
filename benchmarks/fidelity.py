#!/usr/bin/env python
"""Errors of the approximate vggt-turbo configurations against the exact one (the same entry point as
``vggt-turbo fidelity``; see ``vggt_turbo.bench.fidelity``).

    python benchmarks/fidelity.py                                  # small model on the CPU, random weights
    python benchmarks/fidelity.py --device cuda --weights model.pt --out benchmarks/results/fidelity.json
"""

import sys

from vggt_turbo.bench.fidelity_cli import main

if __name__ == "__main__":
    sys.exit(main())
