"""SAM as an Axolotl plugin.

In the Axolotl YAML::

    plugins:
      - hf_sam.integrations.axolotl.SAMPlugin
    sam_rho: 0.05        # any `sam_*` setting of `SAMTrainingArguments`, at the top level

The keys are validated with the rest of the config (Axolotl merges `SAMAxolotlArgs` into its pydantic model), with
`SAMConfig`'s errors. The plugin turns the trainer that Axolotl built into a SAM trainer in `post_trainer_create`
rather than returning a class from `get_trainer_cls`: that hook replaces Axolotl's own choice of trainer (the first
plugin to answer wins), while `post_trainer_create` sees whichever trainer Axolotl or another plugin built.
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, model_validator
from transformers.utils import logging

from ..trainer import enable_sam
from . import SAM_KEYS, check_sam_keys, sam_config_from_keys

logger = logging.get_logger(__name__)

SOURCE = "the Axolotl config"


class SAMAxolotlArgs(BaseModel):
    """The `sam_*` keys of the Axolotl YAML; unset keys (`None`) keep `SAMConfig`'s defaults.

    Numbers are typed so that YAML's `1e-3` (a string to YAML 1.1) is read as a number; the choices stay strings so
    that `SAMConfig` names the valid values.
    """

    sam_rho: float | None = None
    sam_adaptive: bool | None = None
    sam_eta: float | None = None
    sam_accumulation: str | None = None
    sam_sync: str | None = None
    sam_method: str | None = None
    sam_looksam_interval: int | None = None
    sam_looksam_alpha: float | None = None
    sam_start_fraction: float | None = None
    sam_interval: int | None = None
    sam_ascent_fraction: float | None = None
    sam_rho_schedule: str | None = None
    sam_rho_min: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_sam_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_sam_keys(data.keys(), SOURCE)
        return data

    @model_validator(mode="after")
    def _valid_sam_config(self) -> SAMAxolotlArgs:
        sam_config_from_keys({k: getattr(self, k) for k in SAM_KEYS}, SOURCE)
        return self


assert set(SAMAxolotlArgs.model_fields) == set(SAM_KEYS), "SAMAxolotlArgs must list every SAMConfig setting"


class SAMPlugin(BasePlugin):
    """Trains with SAM: `enable_sam` on the trainer Axolotl built, with the `sam_*` settings of the config."""

    def get_input_args(self) -> str:
        return f"{__name__}.SAMAxolotlArgs"

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        sam_config = sam_config_from_keys(cfg, SOURCE)
        name = type(trainer).__name__
        enable_sam(trainer, sam_config)
        logger.info(f"SAM enabled on Axolotl's {name}: {sam_config}")
