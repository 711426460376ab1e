"""The ``moe`` config section: accepted so configs that carry one validate, and nothing more.

DeepSpeed configures mixture-of-experts in model code (the ``MoE`` constructor's arguments), not in the
JSON config, and so does ds-moe. The section exists because ds-core reserves the ``moe`` key for this
package; any key other than ``enabled`` is rejected, pointing at the constructor.
"""

from __future__ import annotations

from pydantic import Field

from ds_core.config.sections import Section

__all__ = ["MoEConfig"]


class MoEConfig(Section):
    """``moe``: no options; pass ``num_experts``, ``ep_size``, ``k``, ... to ``ds_moe.MoE``."""

    enabled: bool = Field(True, description="Accepted for compatibility; MoE layers are enabled by building "
                                            "them in the model (ds_moe.MoE), not by the config.")
