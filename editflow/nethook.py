"""Minimal hooks on named modules: capture inputs/outputs, patch outputs, stop a forward pass early.

In the spirit of ROME's ``util/nethook.py``, but only what editflow needs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the needed layers have run."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name`` (a dotted path), with a clear error if it is missing."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise KeyError(f"model has no module named {name!r}") from exc


def first_tensor(output: object) -> torch.Tensor:
    """A block's hidden states, whether the module returned a tensor or a tuple starting with one."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


def replace_first_tensor(output: object, hidden: torch.Tensor) -> object:
    """``output`` with its hidden states replaced by ``hidden`` (keeps tuple structure)."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


@contextlib.contextmanager
def hooks(handles: Sequence[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Remove the given hook handles on exit."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture(
    model: nn.Module,
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
    stop_after: str | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of ``inputs_of`` and the hidden output of ``outputs_of``.

    ``transform(name, tensor)`` may reduce what is kept (e.g. gather the fact-token rows) so that
    full activations are never stored. ``stop_after`` names a module after whose forward the pass is
    aborted with :class:`StopForward`; use :func:`run_until_stopped` to call the model.
    """
    store: dict[str, torch.Tensor] = {}
    keep = transform or (lambda _name, t: t)
    handles = []

    def pre_hook(name: str) -> Callable:
        def fn(_module: nn.Module, args: tuple) -> None:
            store[name] = keep(name, args[0])
            if stop_after == name and name not in outputs_of:
                raise StopForward

        return fn

    def post_hook(name: str) -> Callable:
        def fn(_module: nn.Module, _args: tuple, output: object) -> None:
            store[name] = keep(name, first_tensor(output))
            if stop_after == name:
                raise StopForward

        return fn

    for name in inputs_of:
        handles.append(get_module(model, name).register_forward_pre_hook(pre_hook(name)))
    for name in outputs_of:
        handles.append(get_module(model, name).register_forward_hook(post_hook(name)))
    if stop_after is not None and stop_after not in inputs_of and stop_after not in outputs_of:

        def stop(_m: nn.Module, _a: tuple, _o: object) -> None:
            raise StopForward

        handles.append(get_module(model, stop_after).register_forward_hook(stop))
    with hooks(handles):
        yield store


@contextlib.contextmanager
def patch_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the hidden output ``h`` of module ``name`` by ``fn(h)`` for the duration."""

    def hook(_module: nn.Module, _args: tuple, output: object) -> object:
        return replace_first_tensor(output, fn(first_tensor(output)))

    with hooks([get_module(model, name).register_forward_hook(hook)]):
        yield


@contextlib.contextmanager
def replace_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    """Swap the named submodules for ``replacements`` for the duration; the originals go back on exit."""
    originals = {name: get_module(model, name) for name in replacements}
    try:
        for name, module in replacements.items():
            model.set_submodule(name, module)
        yield
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


def run_until_stopped(model: nn.Module, **inputs: torch.Tensor) -> object | None:
    """Call ``model(**inputs)``; return its output, or ``None`` if a hook stopped it early."""
    try:
        return model(**inputs)
    except StopForward:
        return None


def output_of(model: nn.Module, name: str, stop_after: str | None = None, **inputs: object) -> object:
    """The output of module ``name`` as it returns it (tensor or tuple), in a forward stopped after
    module ``stop_after`` (default: ``name`` itself)."""
    got: list[object] = []

    def keep(_module: nn.Module, _args: tuple, output: object) -> None:
        got.append(output)

    def stop(_module: nn.Module, _args: tuple, _output: object) -> None:
        raise StopForward

    with hooks(
        [
            get_module(model, name).register_forward_hook(keep),
            get_module(model, stop_after or name).register_forward_hook(stop),
        ]
    ):
        run_until_stopped(model, **inputs)
    return got[0]


def cache_kwarg(model: nn.Module) -> str:
    """Name of ``model.forward``'s KV-cache argument: ``cache`` (newer transformers) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> object:
    """A transformers KV cache, empty or holding ``layers`` = [(keys, values) per layer]."""
    from transformers import DynamicCache

    return DynamicCache(layers) if layers is not None else DynamicCache()


def cache_prefix(cache: object, columns: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the cached keys and values of the first ``columns`` positions
    ((batch, heads, columns, head_dim) each; empty when nothing was cached)."""
    return [(c.keys[:, :, :columns], c.values[:, :, :columns]) for c in cache.layers]  # type: ignore[attr-defined]
