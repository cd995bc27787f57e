"""Models by name: registered zoo entries or a user's ``package.module:factory``.

    from diralign.models import build_model
    net = build_model("deep-linear", in_features=6, widths=(8, 8))
    net = build_model("mypkg.nets:make", num_classes=10, in_shape=(3, 32, 32))

Keyword arguments a factory does not accept are dropped, so every factory can be called
with the same context (``num_classes``, ``in_features``, ``in_shape``, ``generator`` ...).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from ..errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def decorator(factory):
        MODELS[name] = factory
        return factory

    return decorator


def _accepted(factory, kwargs: dict) -> dict:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise UserError(
            f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))} or give package.module:factory"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the user's module raises on import
        raise UserError(
            f"cannot import {module_name!r} for model {name!r} ({type(exc).__name__}: {exc}); is it on PYTHONPATH?"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UserError(f"{module_name} has no callable {attr!r}; model must be package.module:factory")
    return factory


def build_model(name: str, **kwargs) -> nn.Module:
    factory = resolve_factory(name)
    try:
        model = factory(**_accepted(factory, kwargs))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"model factory {name!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"model {name!r} has no trainable parameters")
    return model
