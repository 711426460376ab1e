"""Compressed communication: 1-bit Adam, 0/1 Adam and 1-bit LAMB (``docs/comm-efficient.md``).

- ``compressed.py``: the error-compensated 1-bit all-reduce (signs packed eight to a byte).
- ``optimizers.py``: the three optimizers, which average their momentum through it.
- ``strategy.py``: the data-parallel strategy the engine uses when ``optimizer.type`` names one of
  them: stage 0 whose plain gradient all-reduce runs only during warm-up (import it as
  ``ds_core.optim.onebit.strategy``: it builds on the engine, which imports this package's optimizers).

They live in ds-core beside the other optimizers because the config's ``optimizer`` section (ds-core's)
selects them and they need nothing but ``ds_core.comm``.
"""

from .compressed import CompressedAllReduce, pack_signs, unpack_signs
from .optimizers import OneBitAdam, OneBitLamb, OneBitOptimizer, ZeroOneAdam

__all__ = ["CompressedAllReduce", "pack_signs", "unpack_signs", "OneBitAdam", "ZeroOneAdam", "OneBitLamb",
           "OneBitOptimizer"]
