"""Which parameters SAM perturbs and which buffers it saves: a model's listing, kept up to date cheaply."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["ModelListing"]


class ModelListing:
    """A model's trainable parameters and buffers, listed once and listed again only after its structure changed.

    Listing walks every module: milliseconds per step on a LoRA model with thousands of modules, more than SAM's own
    work there. A registration into one of the model's modules (`register_parameter`, `register_buffer`,
    `add_module`, assigning a module or parameter attribute: PEFT adding an adapter, resized embeddings) goes through
    torch's global registration hooks and marks the list stale; registrations elsewhere (a model's forward slicing its
    `ModuleList` builds a new container each time) do not. `requires_grad` is read afresh at every call, so freezing
    and unfreezing layers during training needs no new listing. The model is held weakly, and the listing is dropped
    with it: SAM never keeps a model alive that the Trainer replaced (`model_init`).
    """

    _live: weakref.WeakSet[ModelListing] = weakref.WeakSet()
    _hooks_installed = False

    def __init__(self) -> None:
        if not ModelListing._hooks_installed:
            from torch.nn.modules import module as torch_module

            torch_module.register_module_parameter_registration_hook(ModelListing._registered)
            torch_module.register_module_module_registration_hook(ModelListing._registered)
            torch_module.register_module_buffer_registration_hook(ModelListing._registered)
            ModelListing._hooks_installed = True
        self.clear()
        ModelListing._live.add(self)  # after `clear`: the hook reads `_module_ids`

    @staticmethod
    def _registered(module: nn.Module, name: str, value: Any) -> None:
        for listing in ModelListing._live:  # returns None: the registration itself is left unchanged
            if id(module) in listing._module_ids:
                listing._stale = True

    def clear(self, *_: Any) -> None:
        self._model: weakref.ref | None = None
        self._module_ids: set[int] = set()
        self._all: list[torch.Tensor] = []
        self._buffer_owners: list[tuple[nn.Module, str]] = []
        self._stale = True

    def _refresh(self, model: nn.Module) -> None:
        if self._stale or self._model is None or self._model() is not model:
            modules = list(model.modules())
            self._module_ids = {id(m) for m in modules}
            self._all = list(model.parameters())  # yields a tied weight once, so it is perturbed once
            self._buffer_owners = [(m, n) for m in modules for n, b in m._buffers.items() if b is not None]
            self._model, self._stale = weakref.ref(model, self.clear), False

    def __call__(self, model: nn.Module) -> list[torch.Tensor]:
        """The trainable parameters of `model`."""
        self._refresh(model)
        return [p for p in self._all if p.requires_grad]

    def buffer_owners(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """Every buffer of `model` as (owning module, name)."""
        self._refresh(model)
        return self._buffer_owners
