"""Registry layer: name → factory tables, the spec grammar, model construction, plugin protocol.

Installed as ``cellseg_plugins.registry``; knows nothing of concrete plugins.
"""

from .factory import PluginConfigError, apply_plugins, arch_of, create_model
from .protocol import (AuxOutput, PluginModule, auxiliary_loss, epoch_start, step_start,
                       training_loss)
from .registry import (Entry, all_entries, get_entry, list_archs, list_plugins, load_third_party,
                       register_arch, register_plugin, third_party_errors)
from .schema import Param, Range
from .spec import Spec, SpecError, Term, parse_spec

__all__ = [
    "AuxOutput", "Entry", "Param", "PluginConfigError", "PluginModule", "Range", "Spec",
    "SpecError", "Term", "all_entries", "apply_plugins", "arch_of", "auxiliary_loss",
    "create_model", "epoch_start", "get_entry", "list_archs", "list_plugins", "load_third_party",
    "parse_spec", "register_arch", "register_plugin", "step_start", "third_party_errors",
    "training_loss",
]
