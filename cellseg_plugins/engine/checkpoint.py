"""Checkpoints: written atomically, rebuilt from the canonical spec they store."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import DataError
from ..registry import Spec, SpecError, Term, create_model, get_entry, parse_spec

FORMAT = "cellseg-checkpoint-1"
TMP_SUFFIX = ".partial"
LOCK_NAME = ".cellseg.lock"


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a finished temporary file over ``path``, with the permissions a new file gets
    (mkstemp makes files readable by their owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``: a
    reader (or a crash) sees the old file or the new one, never half of one. The temporary
    file is removed if ``write`` fails (a full disk, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def hold_folder(folder: Path):
    """Lock ``folder`` for this process: an exclusive advisory lock (flock) on
    FOLDER/.cellseg.lock, which the OS releases when the process ends, however it ends. Returns
    the open lock file (closing it releases the lock); None where the platform or the file
    system has no flock (the folder is then used unlocked, as before locks).
    Raises DataError naming the folder and the holder's pid when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_NAME, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise DataError(f"{str(folder)!r} is in use by another cellseg process (pid {holder}): "
                        "wait for it, or stop it and resume") from None
    except OSError:  # a file system without locks (some NFS mounts): go on unlocked
        lock.close()
        return None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def release(lock) -> None:
    """Release a lock from :func:`hold_folder` (None: nothing to release)."""
    if lock is not None:
        lock.close()


@contextmanager
def holding(folder: Path):
    """``with holding(folder):`` :func:`hold_folder` for the block."""
    lock = hold_folder(folder)
    try:
        yield
    finally:
        release(lock)


def remove_stale(folder: Path) -> list[Path]:
    """Delete temporary files a killed process left in ``folder``; returns them."""
    stale = list(Path(folder).glob(f".*{TMP_SUFFIX}")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def exported_kind(path: Path) -> str | None:
    """What ``cellseg export`` wrote ``path`` as ('an ONNX model', 'a TorchScript export', 'a
    BioImage Model Zoo package'), or None for any other file (a checkpoint included)."""
    if path.suffix.lower() == ".onnx":
        return "an ONNX model"
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if "rdf.yaml" in names:
        return "a BioImage Model Zoo package"
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return "a TorchScript export"
    return None


def load_weights_file(path: str | Path, objects_hint: str = ""):
    """What torch.load reads from ``path`` (tensors and plain types only: no arbitrary
    pickles, whose DataError ends with ``objects_hint``); DataError in one line for a folder,
    a missing file, an export or another file."""
    path = Path(path)
    if path.is_dir():
        hint = (f": pass {str(path / 'best.pt')!r} (or last.pt)" if (path / "best.pt").is_file()
                else ", not a checkpoint file (a .pt file that training writes)")
        raise DataError(f"checkpoint {str(path)!r} is a folder{hint}")
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    kind = exported_kind(path)
    if kind:
        raise DataError(f"{str(path)!r} is {kind}, not a checkpoint: give the checkpoint (.pt) "
                        "it was exported from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # not torch.save's format: another kind of file
            raise DataError(f"checkpoint {str(path)!r} is unreadable (UnpicklingError)") from None
        raise DataError(f"checkpoint {str(path)!r} holds pickled Python objects, not only "
                        f"tensors (cellseg loads no pickled code){objects_hint}") from None
    except Exception as e:
        raise DataError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__})") from None


def is_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str | Path) -> dict:
    ckpt = load_weights_file(path)
    if not is_checkpoint(ckpt):
        raise DataError(f"{str(path)!r} is not a cellseg checkpoint (expected format {FORMAT})")
    return ckpt


def as_built_before(spec: str, missing: set[str]) -> str | None:
    """``spec`` with each plugin's ``added_params`` (``register_plugin``) that it leaves unset
    set to the value older checkpoints were built with, where ``missing`` (the state-dict keys
    a checkpoint lacks) are all keys those parameters add; otherwise None."""
    parsed, patterns, plugins = parse_spec(spec), [], []
    for term in parsed.plugins:
        added = {name: old for name, old in
                 get_entry(term.name).extra.get("added_params", {}).items()
                 if name not in term.kwargs}
        patterns += [re.compile(keys) for _, keys in added.values()]
        old_values = tuple((name, value) for name, (value, _) in added.items())
        plugins.append(Term(term.name, term.params + old_values))
    if not missing or not all(any(p.search(k) for p in patterns) for k in missing):
        return None
    return str(Spec(parsed.arch, tuple(plugins)))


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """The trained model of ``ckpt``. A checkpoint saved before a plugin parameter was added
    (e.g. lfa's ``decoder_norm``, whose ``auto`` adds a BatchNorm on FPN and Linknet) is rebuilt
    as it was trained (:func:`as_built_before`), and ``ckpt["spec"]`` is rewritten to say so."""
    def build():
        return create_model(ckpt["spec"], in_channels=ckpt["in_channels"],
                            classes=len(ckpt["class_names"]))

    try:
        model = build()
        before = as_built_before(ckpt["spec"], set(model.state_dict()) - set(ckpt["model"]))
        if before:
            ckpt["spec"] = before
            model = build()
        model.load_state_dict(ckpt["model"])
    except (SpecError, RuntimeError) as e:
        raise DataError(f"checkpoint does not rebuild: {' '.join(str(e).split())[:300]}") from None
    return model


def load_model(path: str | Path) -> torch.nn.Module:
    """The trained model of a cellseg checkpoint, in eval mode on the CPU, with
    ``cellseg_class_names`` and ``cellseg_norm`` (the per-channel mean and std its inputs are
    normalised with: ``(image - mean) / std``). Bad files raise DataError in one line."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt).eval()
    model.cellseg_class_names = list(ckpt["class_names"])
    model.cellseg_norm = dict(ckpt["norm"])
    return model
