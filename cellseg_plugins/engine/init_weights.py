"""``--init``: the weights a fine-tuning run starts from, and copying them into a model.

Sources: a cellseg checkpoint; a state dict saved with ``torch.save(model.state_dict())``
(``.pt``, ``.pth``, ``.bin``; also wrapped in a training checkpoint's ``state_dict`` /
``model_state_dict`` / ``model`` entry, as PyTorch Lightning and many scripts save it) or a
``.safetensors`` file; an smp ``save_pretrained`` folder (``config.json`` and
``model.safetensors``); ``hf-hub:OWNER/NAME``, such a folder on the Hugging Face Hub (timm's
prefix), downloaded through ``huggingface_hub`` as ``smp.from_pretrained`` does.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .checkpoint import is_checkpoint, load_weights_file

HUB = "hf-hub:"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
PICKLED = ": a whole model saved with torch.save? save its state_dict()"
KINDS = ("a cellseg checkpoint, a state dict (.pt, .pth, .safetensors), an smp save_pretrained "
         "folder or hf-hub:OWNER/NAME")


@dataclass
class InitWeights:
    """Named tensors to start from; ``holds`` says what they are (for messages); ``checkpoint``
    is the cellseg checkpoint they come from, or None."""
    tensors: dict[str, torch.Tensor]
    holds: str
    checkpoint: dict | None = None


def read_init(value: str) -> InitWeights:
    """The weights ``--init value`` names (module docstring); DataError in one line."""
    if value.startswith(HUB):
        return read_folder(download(value[len(HUB):]), value)
    path = Path(value)
    if path.is_dir() and any((path / name).is_file() for name in FOLDER_WEIGHTS):
        return read_folder(path, value)
    if path.is_dir() and not (path / "best.pt").is_file():
        raise DataError(f"checkpoint {value!r} is a folder without weights (expected {KINDS})")
    if path.suffix.lower() == ".safetensors" and path.is_file():
        return InitWeights(read_safetensors(path), f"a state dict of {path.name}")
    loaded = load_weights_file(path, PICKLED)
    if is_checkpoint(loaded):
        return InitWeights(loaded["model"], repr(loaded["spec"]), loaded)
    return InitWeights(state_dict_in(loaded, value), f"a state dict of {path.name}")


def read_state_dict(path: Path, value: str) -> dict[str, torch.Tensor]:
    return state_dict_in(load_weights_file(path, PICKLED), value)


def state_dict_in(obj, value: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded state dict, or of the state dict a training checkpoint wraps
    (whichever of them holds the most)."""
    candidates = [obj] + [obj.get(key) for key in STATE_DICT_KEYS if isinstance(obj, dict)]
    found = [{k: v for k, v in c.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
             for c in candidates if isinstance(c, dict)]
    tensors = max(found, key=len, default={})
    if not tensors:
        raise DataError(f"checkpoint {value!r} holds no tensors by name (expected {KINDS})")
    return tensors


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        reason = textwrap.shorten(str(e), 120, placeholder=" …")
        raise DataError(f"checkpoint {str(path)!r} is unreadable ({reason})") from None


def read_folder(folder: Path, value: str) -> InitWeights:
    """An smp ``save_pretrained`` folder: its weights, described by its config.json."""
    weights = next((folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise DataError(f"checkpoint {value!r} has no {' or '.join(FOLDER_WEIGHTS)}")
    tensors = (read_safetensors(weights) if weights.suffix == ".safetensors" else
               read_state_dict(weights, value))
    try:
        config = json.loads((folder / "config.json").read_text())
        holds = f"smp {config['_model_class']}(encoder_name={config['encoder_name']!r})"
    except (OSError, ValueError, KeyError, TypeError):
        holds = f"a state dict of {weights.name}"
    return InitWeights(tensors, holds)


def download(repo: str) -> Path:
    """The local folder of Hugging Face Hub repository ``repo`` (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise DataError(f"checkpoint {HUB + repo!r}: expected {HUB}OWNER/NAME")
    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", *FOLDER_WEIGHTS]))
    except Exception as e:  # network, authorisation, a missing repository: one line
        reason = textwrap.shorten(str(e), 160, placeholder=" …")
        raise DataError(f"checkpoint {HUB + repo!r}: download failed ({type(e).__name__}: "
                        f"{reason})") from None


def init_from(model: torch.nn.Module, weights: InitWeights, value: str
              ) -> tuple[list[str], list[str]]:
    """Copy into ``model`` every tensor of ``weights`` whose name and shape match (fine-tuning).

    Names may carry one leading prefix the model lacks (``module.`` of DDP, ``model.`` of
    Lightning): the prefix under which most tensors match is dropped. A one-channel model's
    first convolution takes a C-channel one's weights summed over their input channels (as
    smp adapts pretrained encoders to grey input: the same output as feeding that model the
    grey image repeated C times). Returns (the names of ``model``'s tensors
    left as they were, the names summed over input channels). Raises DataError where fewer
    than half of the model's tensors match (another architecture or encoder: a few coinciding
    names would make no fine-tuning)."""
    own = model.state_dict()
    matching, summed = {}, []
    prefixes = [""] + sorted({k.split(".", 1)[0] + "." for k in weights.tensors if "." in k})
    for prefix in prefixes:
        found, adapted = {}, []
        for key, tensor in weights.tensors.items():
            name = key[len(prefix):]
            if not key.startswith(prefix) or name not in own:
                continue
            if own[name].shape == tensor.shape:
                found[name] = tensor
            elif grey_first_conv(own[name], tensor):
                found[name] = tensor.sum(1, keepdim=True)
                adapted.append(name)
        if len(found) > len(matching):
            matching, summed = found, adapted
    if 2 * len(matching) < len(own):
        raise DataError(f"--init {value!r}: only {len(matching)} of this model's {len(own)} "
                        f"tensors are in it (it holds {weights.holds}); give weights of the same "
                        "architecture and encoder")
    model.load_state_dict(matching, strict=False)
    return [k for k in own if k not in matching], summed


def grey_first_conv(own: torch.Tensor, theirs: torch.Tensor) -> bool:
    """A one-input-channel conv weight (O, 1, k, k) where ``theirs`` is (O, C, k, k), C > 1."""
    return (own.dim() == theirs.dim() == 4 and own.shape[1] == 1 and theirs.shape[1] > 1
            and own.shape[0] == theirs.shape[0] and own.shape[2:] == theirs.shape[2:])

