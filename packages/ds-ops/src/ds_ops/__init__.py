"""ds-ops: kernels registered as torch.library custom ops in the ``ds_ops`` namespace."""

__version__ = "0.0.1"

__all__: list[str] = []
