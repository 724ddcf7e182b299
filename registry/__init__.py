"""Registry layer: name → factory tables, the spec grammar, model construction, plugin protocol.

Installed as ``cellseg_plugins.registry``; knows nothing of concrete plugins. Names are
imported on first use (so that ``cellseg --help`` loads no torch).
"""

import importlib

_WHERE = {
    "apply_plugins": "factory", "arch_of": "factory", "create_model": "factory",
    "AuxOutput": "protocol", "PluginModule": "protocol", "auxiliary_loss": "protocol",
    "epoch_start": "protocol", "plugin_modules": "protocol", "step_start": "protocol",
    "training_loss": "protocol",
    "Entry": "registry", "all_entries": "registry", "get_entry": "registry",
    "list_archs": "registry", "list_plugins": "registry", "load_third_party": "registry",
    "register_arch": "registry", "register_plugin": "registry", "third_party_errors": "registry",
    "unregister": "registry",
    "Param": "schema", "Range": "schema",
    "Spec": "spec", "Term": "spec", "parse_spec": "spec",
}
_ERRORS = ("PluginConfigError", "SpecError")

__all__ = sorted([*_WHERE, *_ERRORS])


def __getattr__(name: str):
    if name in _ERRORS:
        module = importlib.import_module("..errors", __name__)
    elif name in _WHERE:
        module = importlib.import_module(f".{_WHERE[name]}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value
