"""ds-pipe: pipeline parallelism — PipelineModule, 1F1B schedules, tied layers.

``PipelineModule(layers, num_stages=...)`` cuts a layer list into stages; ``ds_core.initialize``
returns a :class:`PipelineEngine` for it, whose ``train_batch(data_iter)`` runs one batch of
micro-batches under the synchronous 1F1B schedule. Schedules are data (``ds_pipe.schedule``).
"""

__version__ = "0.1.0"

from .config import PipelineConfig
from .engine import PipelineEngine, PipelineError
from .executor import PipeDataError
from .module import PipelineModule
from .p2p import PipeCommError
from .schedule import GPipeSchedule, InferenceSchedule, TrainSchedule
from .spec import LayerSpec, TiedLayerSpec

__all__ = [
    "PipelineModule", "LayerSpec", "TiedLayerSpec", "PipelineEngine", "PipelineConfig",
    "PipelineError", "PipeDataError", "PipeCommError", "TrainSchedule", "GPipeSchedule",
    "InferenceSchedule", "__version__",
]
