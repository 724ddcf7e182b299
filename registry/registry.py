"""Name → factory tables for architectures and plugins (timm-style decorators)."""

from __future__ import annotations

import fnmatch
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from .schema import Param, params_from_signature

Kind = Literal["arch", "plugin"]

# Parameters every architecture factory receives from create_model, not from the spec string.
ARCH_CONTEXT = ("in_channels", "classes")


@dataclass(frozen=True)
class Entry:
    """A registered architecture or plugin.

    ``supports`` (plugins only) names the architectures the plugin bolts onto: a tuple of
    names, a predicate over arch entries (``lambda arch: arch.extra["skips"]``, so that archs
    registered later are covered too), or ``None`` for all.
    ``repeatable`` says whether the plugin may appear twice in one spec; plugins sharing an
    ``exclusive`` group (e.g. "rounds") may not be combined.
    """

    name: str
    kind: Kind
    factory: Callable
    description: str
    params: tuple[Param, ...]
    supports: tuple[str, ...] | Callable[["Entry"], bool] | None = None
    repeatable: bool = False
    exclusive: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def param(self, name: str) -> Param | None:
        """Look a parameter up by name, case-insensitively."""
        for p in self.params:
            if p.name == name:
                return p
        lowered = [p for p in self.params if p.name.lower() == name.lower()]
        return lowered[0] if len(lowered) == 1 else None

    def supports_arch(self, arch: str) -> bool:
        if self.supports is None:
            return True
        if callable(self.supports):
            entry = get_entry(arch)
            return entry is not None and entry.kind == "arch" and bool(self.supports(entry))
        return arch in self.supports

    def supported_archs(self) -> list[str]:
        """Names of the registered architectures this plugin supports."""
        return [e.name for e in all_entries("arch") if self.supports_arch(e.name)]

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "params": [p.to_json() for p in self.params],
        }
        if "input" in self.extra:
            out["input"] = self.extra["input"]
        if self.kind == "plugin":
            out["supports"] = self.supported_archs() if self.supports is not None else "all"
            out["repeatable"] = self.repeatable
            if self.exclusive:
                out["exclusive"] = self.exclusive
        return out


_ENTRIES: dict[str, Entry] = {}
_BUILTINS = ("cellseg_plugins.encoders", "cellseg_plugins.archs", "cellseg_plugins.classic_unet",
             "cellseg_plugins.plugins")
_loaded = False


def _entries() -> dict[str, Entry]:
    """The table, with the built-in archs and plugins (and third-party packages) registered
    the first time it is consulted."""
    global _loaded
    if not _loaded:
        import importlib

        _loaded = True
        for module in _BUILTINS:
            importlib.import_module(module)
        load_third_party()
    return _ENTRIES


def first_line(doc: str | None) -> str:
    return inspect.cleandoc(doc or "").split("\n", 1)[0].strip()


def add_entry(entry: Entry) -> Entry:
    """Register ``entry``; a name may be registered once, across archs and plugins."""
    key = entry.name.lower()
    if key in _ENTRIES:
        raise ValueError(f"{entry.name!r} is already registered as {_ENTRIES[key].kind}")
    _ENTRIES[key] = entry
    return entry


def register_arch(name: str, description: str | None = None, model_class: type | None = None,
                  input: str | None = None, params: tuple[Param, ...] | None = None, **facts):
    """Decorator: register ``factory(in_channels, classes, **params) -> nn.Module`` as an arch.

    ``model_class``: the class the factory builds, so that plugins applied to a model built
    elsewhere (``apply_plugins``) know its architecture. ``input``: the input sides it takes
    with its defaults, in words (``cellseg list`` shows it). ``params``: the parameter schema,
    if not the factory's signature. ``facts`` (``skips=True``, ``feature_list=True``, ...)
    are what plugins' ``supports`` predicates ask.
    """

    def deco(factory: Callable) -> Callable:
        extra = {"model_class": model_class, "input": input, **facts}
        add_entry(Entry(
            name=name.lower(), kind="arch", factory=factory,
            description=description or first_line(factory.__doc__),
            params=params if params is not None else params_from_signature(factory,
                                                                           skip=ARCH_CONTEXT),
            extra={k: v for k, v in extra.items() if v is not None},
        ))
        return factory

    return deco


def register_plugin(
    name: str,
    supports: Iterable[str] | Callable[[Entry], bool] | None = None,
    repeatable: bool = False,
    description: str | None = None,
    exclusive: str | None = None,
    added_params: dict[str, tuple[Any, str]] | None = None,
):
    """Decorator: register ``factory(model, **params) -> nn.Module`` as a plugin.

    The factory's keyword parameters, with their type hints and defaults, become the plugin's
    parameter schema. ``supports`` names the architectures it works on (default: all).
    ``added_params``: parameters added after checkpoints were saved, name → (the value those
    checkpoints were built with, a regex matching the state-dict keys the new default adds):
    a checkpoint that lacks exactly such keys is rebuilt with the old value.
    """

    def deco(factory: Callable) -> Callable:
        first = next(iter(inspect.signature(factory).parameters), None)
        params = params_from_signature(factory, skip=(first,))
        for added, (_, keys) in (added_params or {}).items():
            if added not in {p.name for p in params}:
                raise ValueError(f"plugin {name!r}: added_params names {added!r}, which is not "
                                 f"one of its parameters ({', '.join(p.name for p in params)})")
            re.compile(keys)  # a bad pattern fails here, not when a checkpoint loads
        add_entry(Entry(
            name=name.lower(), kind="plugin", factory=factory,
            description=description or first_line(factory.__doc__),
            params=params,
            supports=(supports if supports is None or callable(supports)
                      else tuple(s.lower() for s in supports)),
            repeatable=repeatable, exclusive=exclusive,
            extra={"added_params": added_params} if added_params else {},
        ))
        return factory

    return deco


def get_entry(name: str) -> Entry | None:
    return _entries().get(name.lower())


def all_entries(kind: Kind | None = None) -> list[Entry]:
    return sorted((e for e in _entries().values() if kind is None or e.kind == kind),
                  key=lambda e: e.name)


def unregister(name: str) -> Entry:
    """Remove a registered architecture or plugin (tests, or replacing a plugin); returns it."""
    entry = _entries().pop(name.lower(), None)
    if entry is None:
        raise KeyError(f"{name!r} is not registered")
    return entry


def _list(kind: Kind, pattern: str) -> list[str]:
    return [e.name for e in all_entries(kind) if fnmatch.fnmatch(e.name, pattern.lower())]


def list_archs(pattern: str = "*") -> list[str]:
    """Sorted names of registered architectures matching an fnmatch ``pattern``."""
    return _list("arch", pattern)


def list_plugins(pattern: str = "*") -> list[str]:
    """Sorted names of registered plugins matching an fnmatch ``pattern``."""
    return _list("plugin", pattern)


# ---------------------------------------------------------------- third-party packages

ENTRY_POINT_GROUP = "cellseg.plugins"
_THIRD_PARTY_ERRORS: dict[str, str] = {}


def load_third_party() -> dict[str, str]:
    """Import every package registered under the entry-point group ``cellseg.plugins``.

    An entry point names a module (importing it registers its plugins and archs with the
    decorators) or a function (called with no arguments). A package that fails to load is
    skipped; its one-line reason is returned (and kept for ``cellseg list`` to show).
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        package = ep.dist.name if ep.dist else ep.value
        try:
            loaded = ep.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()
        except Exception as e:  # a broken third-party package must not break cellseg
            _THIRD_PARTY_ERRORS[package] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return dict(_THIRD_PARTY_ERRORS)


def third_party_errors() -> dict[str, str]:
    """Packages of the ``cellseg.plugins`` group that failed to load, with the reason."""
    _entries()  # the group is loaded with the registry
    return dict(_THIRD_PARTY_ERRORS)
