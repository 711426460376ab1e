"""Converting checkpoints of other frameworks into ds checkpoints (safetensors + JSON).

``convert_deepspeed(ckpt_dir, out_dir)`` (also ``ds convert-deepspeed CKPT_DIR OUT_DIR``) reads a
DeepSpeed checkpoint directory through a restricted unpickler (:mod:`ds_core.convert.unpickler`) and
writes a checkpoint that ``engine.load_checkpoint`` resumes at any world size.
"""

from __future__ import annotations

from .deepspeed import DeepSpeedState, convert_deepspeed, read_deepspeed
from .unpickler import DEEPSPEED_CLASSES, InertObject, UnsafeCheckpointError, load_restricted

__all__ = ["convert_deepspeed", "read_deepspeed", "DeepSpeedState", "UnsafeCheckpointError", "InertObject",
           "load_restricted", "DEEPSPEED_CLASSES"]
