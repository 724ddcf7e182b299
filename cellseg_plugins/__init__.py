"""cellseg: published cell-segmentation methods as plugins for any smp encoder-decoder.

    import cellseg_plugins as cs
    model = cs.create_model("unet+lfa(m=7)+frem(B=8,X=250)", in_channels=1, classes=5)
"""

from .registry import (
    PluginConfigError, PluginModule, Range, Spec, SpecError, apply_plugins, auxiliary_loss,
    create_model, epoch_start, list_archs, list_plugins, parse_spec, register_arch,
    register_plugin, step_start, training_loss,
)
from . import encoders as _encoders  # noqa: F401  (registers the plain encoders in smp)
from . import archs as _archs  # noqa: F401  (registers every smp architecture)
from . import classic_unet as _classic_unet  # noqa: F401  (registers the papers' U-Net)
from . import plugins as _plugins  # noqa: F401  (registers every plugin)
from .registry import load_third_party as _load_third_party

_load_third_party()  # packages registered under the entry-point group "cellseg.plugins"

__version__ = "0.2.0"

__all__ = [
    "PluginConfigError", "PluginModule", "Range", "Spec", "SpecError", "apply_plugins",
    "auxiliary_loss", "create_model", "epoch_start", "list_archs", "list_plugins", "parse_spec",
    "register_arch", "register_plugin", "step_start", "training_loss", "__version__",
]
