"""What a model card says about SAM: the method, rho and every non-default `sam_*` setting, and the papers.

`add_sam_to_model_card` edits the card text that the Trainer (or TRL) wrote: it adds the settings to the card's
"Training hyperparameters" list where there is one, and a "Sharpness-Aware Minimization" section with the citations.
"""

from __future__ import annotations

import dataclasses
import re

from .config import SAMConfig
from .variants import VARIANTS
from .variants.base import SAM_CITATION
from .variants.functional import CITATION as PRECONDITIONED_SAM_CITATION

__all__ = ["add_sam_to_model_card", "sam_card_section", "sam_method_name"]

# Papers behind settings that combine with every variant; each variant's own paper is in its module.
_CITATIONS = {
    "adaptive": """@inproceedings{kwon2021asam,
    title     = {ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks},
    author    = {Jungmin Kwon and Jeongseop Kim and Hyunseo Park and In Kwon Choi},
    booktitle = {International Conference on Machine Learning},
    year      = {2021},
    url       = {https://arxiv.org/abs/2102.11600}
}""",
    "rho_lr": """@inproceedings{zhuang2022gsam,
    title     = {Surrogate Gap Minimization Improves Sharpness-Aware Training},
    author    = {Juntang Zhuang and Boqing Gong and Liangzhe Yuan and Yin Cui and Hartwig Adam and Nicha Dvornek and
                 Sekhar Tatikonda and James Duncan and Ting Liu},
    booktitle = {International Conference on Learning Representations},
    year      = {2022},
    url       = {https://arxiv.org/abs/2203.08065}
}""",
    "late_phase": """@article{zhou2024sam,
    title   = {Sharpness-Aware Minimization Efficiently Selects Flatter Minima Late in Training},
    author  = {Zhanpeng Zhou and Mingze Wang and Yuchen Mao and Bingrui Li and Junchi Yan},
    journal = {arXiv preprint arXiv:2410.10373},
    year    = {2024}
}""",
    "preconditioner": PRECONDITIONED_SAM_CITATION,  # Singh et al. 2025, the paper of Functional-SAM too
    "partial_ascent": """@inproceedings{bahri2022sharpness,
    title     = {Sharpness-Aware Minimization Improves Language Model Generalization},
    author    = {Dara Bahri and Hossein Mobahi and Yi Tay},
    booktitle = {Annual Meeting of the Association for Computational Linguistics},
    year      = {2022},
    url       = {https://arxiv.org/abs/2110.08529}
}""",
}


def sam_method_name(config: SAMConfig) -> str:
    """The method as a reader knows it: "SAM", "ASAM", "LookSAM", ..., with "late-phase" where it applies."""
    name = VARIANTS[config.method].name
    name = "ASAM" if config.adaptive and name == "SAM" else name
    return f"late-phase {name}" if config.start_fraction > 0 else name


def _citations(config: SAMConfig) -> list[str]:
    """BibTeX entries: SAM's, the variant's, and those of the settings in use."""
    keys = []
    if config.adaptive:
        keys.append("adaptive")
    if config.rho_schedule == "lr":
        keys.append("rho_lr")
    if config.start_fraction > 0:
        keys.append("late_phase")
    if config.ascent_fraction < 1:
        keys.append("partial_ascent")
    if config.preconditioner != "none":
        keys.append("preconditioner")
    entries = [SAM_CITATION, VARIANTS[config.method].citation] + [_CITATIONS[k] for k in keys]
    return list(dict.fromkeys(entries))


def _settings(config: SAMConfig) -> list[tuple[str, object]]:
    """`sam_rho` always, then every setting that differs from its default."""
    defaults = SAMConfig()
    rows = [("sam_rho", config.rho)]
    for f in dataclasses.fields(SAMConfig):
        value = getattr(config, f.name)
        if f.name != "rho" and value != getattr(defaults, f.name):
            rows.append((f"sam_{f.name}", value))
    return rows


def sam_card_section(config: SAMConfig) -> str:
    """A model-card section: the method, its settings and the BibTeX of its papers."""
    rows = "\n".join(f"- {name}: {value}" for name, value in _settings(config))
    citations = "\n\n".join(_citations(config))
    return (
        "## Sharpness-Aware Minimization\n\n"
        f"This model was trained with {sam_method_name(config)} through "
        "[hf_sam](https://pypi.org/project/hf-sam/): the optimizer listed above stepped with gradients taken at "
        "perturbed weights, as the method's paper describes (cited below).\n\n"
        f"{rows}\n\n"
        "Cite:\n\n"
        f"```bibtex\n{citations}\n```\n"
    )


def add_sam_to_model_card(card: str, config: SAMConfig) -> str:
    """Return `card` with the SAM settings among its hyperparameters (if it lists them) and a SAM section."""
    if "## Sharpness-Aware Minimization" in card:
        return card  # already added (the card is written again at each `push_to_hub`)
    bullets = [f"- sam_method: {sam_method_name(config)}"] + [f"- {n}: {v}" for n, v in _settings(config)]
    match = re.search(r"### Training hyperparameters\n\n(?:[^\n]*\n)*?((?:- [^\n]*\n)+)", card)
    if match is not None:
        end = match.end(1)
        card = card[:end] + "\n".join(bullets) + "\n" + card[end:]
    return card.rstrip("\n") + "\n\n" + sam_card_section(config)
