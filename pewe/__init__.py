"""pewe: the shared library behind the entry scripts (parameter-efficient weight ensembling)."""
import os as _os
import sys as _sys

# GNU OpenMP (the torch CPU wheel's threads) spins at every barrier before it sleeps. On a CPU shared
# with other jobs a spinning thread holds the core its partner needs: a training step ran up to 23x
# slower on a loaded 2-core machine, and 5-16 % faster on an idle one (docs/PERFORMANCE.md, "OpenMP").
# libgomp reads the policy once, when torch loads it; every entry script imports pewe before torch,
# so this is their default. OMP_WAIT_POLICY=ACTIVE (or any value) in the environment overrides it.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
