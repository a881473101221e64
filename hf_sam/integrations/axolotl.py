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

from dataclasses import fields
from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, create_model, model_validator
from transformers.utils import logging

from ..config import SAMConfig
from ..trainer import enable_sam
from . import SAM_KEYS, check_sam_keys, sam_config_from_keys

logger = logging.get_logger(__name__)

SOURCE = "the Axolotl config"


class _SAMKeysCheck(BaseModel):
    """The checks of `SAMAxolotlArgs`; its fields are added from `SAMConfig` below."""

    @model_validator(mode="before")
    @classmethod
    def _known_sam_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_sam_keys(data.keys(), SOURCE)
        return data

    @model_validator(mode="after")
    def _valid_sam_config(self) -> _SAMKeysCheck:
        sam_config_from_keys({k: getattr(self, k) for k in SAM_KEYS}, SOURCE)
        return self


def _field_type(default: Any) -> Any:
    """The pydantic type of a setting, from its default: numbers and booleans typed, so that YAML's `1e-3` (a string
    to YAML 1.1) is read as a number; choices stay strings, so that `SAMConfig` names the valid values."""
    kind = type(default)
    return (kind if kind in (bool, int, float, str) else Any) | None


# One optional field per `SAMConfig` setting (`None`: unset, `SAMConfig`'s default), built from its fields so that a
# new setting needs no change here.
SAMAxolotlArgs = create_model(
    "SAMAxolotlArgs",
    __base__=_SAMKeysCheck,
    __module__=__name__,
    __doc__="The `sam_*` keys of the Axolotl YAML; unset keys keep `SAMConfig`'s defaults.",
    **{f"sam_{f.name}": (_field_type(f.default), None) for f in fields(SAMConfig)},
)


class SAMPlugin(BasePlugin):
    """Trains with SAM: `enable_sam` on the trainer Axolotl built, with the `sam_*` settings of the config."""

    def get_input_args(self) -> str:
        return f"{__name__}.SAMAxolotlArgs"

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        sam_config = sam_config_from_keys(cfg, SOURCE)
        name = type(trainer).__name__
        enable_sam(trainer, sam_config)
        logger.info(f"SAM enabled on Axolotl's {name}: {sam_config}")
