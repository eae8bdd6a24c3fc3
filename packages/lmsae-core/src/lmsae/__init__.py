"""lmsae: sparse dictionaries (SAEs, transcoders, crosscoders, CLTs, Lorsa, MOLT) on LM activations."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenMP workers that spin while waiting steal the cores that the next operation (or the compiled
# kernels' threads, lmsae.nn._kernels) needs: on a shared 2-core CPU the Trainer's TopK step ran
# 3x slower with spinning waits (benchmarks/README.md). libgomp reads the policy once, when torch
# is loaded, so it can only be chosen here if lmsae is imported first (the CLI always is). Set
# OMP_WAIT_POLICY yourself to override.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
