"""cellseg: published cell-segmentation methods as plugins for any smp encoder-decoder.

    import cellseg_plugins as cs
    model = cs.create_model("classic_unet+lfa(m=7)+frem(B=8,X=250)", in_channels=1, classes=5)

Names load on first use: the built-in architectures and plugins (and third-party packages of
the entry-point group ``cellseg.plugins``) are registered the first time the registry is
consulted, so importing the package (and ``cellseg --help``) loads no torch.
"""

import importlib

__version__ = "0.2.0"

_API = ("PluginConfigError", "PluginModule", "Range", "Spec", "SpecError", "apply_plugins",
        "auxiliary_loss", "create_model", "epoch_start", "list_archs", "list_plugins",
        "parse_spec", "plugin_modules", "register_arch", "register_plugin", "step_start",
        "training_loss")
_ERRORS = ("CellsegError", "ConfigError", "DataError", "TrainingError")
_ENGINE = {"load_model": ".engine.checkpoint"}
_MODULES = ("registry", "hooks", "rounds", "blocks", "engine", "plugins", "archs",
            "classic_unet", "encoders", "input_rules", "errors", "cli")

__all__ = [*_API, *_ERRORS, *_ENGINE, "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(".registry", __name__), name)
    elif name in _ERRORS:
        value = getattr(importlib.import_module(".errors", __name__), name)
    elif name in _ENGINE:
        value = getattr(importlib.import_module(_ENGINE[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
