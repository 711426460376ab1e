"""ds-pipe: pipeline parallelism: PipelineModule, 1F1B schedules, tied layers."""

__version__ = "0.0.1"

__all__: list[str] = []
