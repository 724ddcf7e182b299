"""Build models from spec strings: ``create_model`` and ``apply_plugins``."""

from __future__ import annotations

from numbers import Integral

from torch import nn

from ..errors import PluginConfigError

from .protocol import model_built
from .registry import all_entries, get_entry
from .spec import Spec, SpecError, Term, check_added, parse_spec


def create_model(spec: str | Spec, in_channels: int = 1, classes: int = 5, **overrides) -> nn.Module:
    """Build ``arch(...)+plugin(...)+...``; ``overrides`` update the architecture's parameters.

    ``classes`` defaults to 5, the ssTEM five-class map the project's data use.
    The canonical spec is kept as ``model.cellseg_spec`` (checkpoints store it).
    """
    for name, value in (("in_channels", in_channels), ("classes", classes)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise PluginConfigError(f"{name}={value!r}: expected an int ≥ 1")
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec)
    if parsed.arch is None:
        raise SpecError("the spec names no architecture; use apply_plugins for a built model")
    if overrides:
        parsed = parsed.with_arch_params(**overrides)
    entry = get_entry(parsed.arch.name)
    try:
        model = entry.factory(in_channels=in_channels, classes=classes, **parsed.arch.kwargs)
    except PluginConfigError as e:
        raise SpecError(str(e), term=parsed.arch.name) from None
    model.cellseg_in_channels = in_channels
    model = _apply(model, parsed.plugins)
    model.cellseg_spec = str(parsed)
    return model


def apply_plugins(model: nn.Module, spec: str | Spec) -> nn.Module:
    """Apply plugins (``"lfa(m=7)+frem"``) to a model built elsewhere, e.g. ``smp.FPN(...)``.

    A model that has plugins already (``create_model``'s, an earlier ``apply_plugins``) is
    held to the rules a spec follows (a plugin once, one ``rounds`` plugin); its
    ``cellseg_spec``, where it has one, gains the new plugins."""
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec, require_arch=False)
    if parsed.arch is not None:
        raise SpecError(f"apply_plugins takes plugins only; drop the architecture "
                        f"{parsed.arch.name!r}", term=parsed.arch.name)
    arch = arch_of(model)
    for term in parsed.plugins:
        entry = get_entry(term.name)
        if entry.supports is not None and not entry.supports_arch(arch or ""):
            what = f"arch {arch!r}" if arch else f"a {type(model).__name__}"
            raise SpecError(f"plugin {term.name!r} does not support {what}; it supports: "
                            f"{', '.join(entry.supported_archs())}", term=term.name)
    check_added(getattr(model, "cellseg_plugins", ()), parsed.plugins)
    built = getattr(model, "cellseg_spec", None)
    model = _apply(model, parsed.plugins)
    if built is not None and parsed.plugins:
        model.cellseg_spec = str(parse_spec(f"{built}+{parsed}"))
    return model


def _apply(model: nn.Module, plugins: tuple[Term, ...]) -> nn.Module:
    """``plugins`` applied in order; the model records their names (``cellseg_plugins``)."""
    model.__dict__.pop("cellseg_input_rules", None)  # plugins may change what the model takes
    applied = getattr(model, "cellseg_plugins", ())
    for term in plugins:
        try:
            model = get_entry(term.name).factory(model, **term.kwargs)
        except PluginConfigError as e:
            raise SpecError(str(e), term=term.name) from None
    model.cellseg_plugins = applied + tuple(t.name for t in plugins)
    model_built(model)
    return model


def arch_of(model: nn.Module) -> str | None:
    """The registered architecture name of ``model`` (by its class), or None."""
    for entry in all_entries("arch"):
        cls = entry.extra.get("model_class")
        if cls is not None and type(model) is cls:
            return entry.name
    return None
