"""Checkpoints: written atomically, rebuilt from the canonical spec they store."""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..registry import Spec, SpecError, Term, create_model, parse_spec
from .data import DataError

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


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary pickles
    except Exception as e:
        raise DataError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} is not a cellseg checkpoint (expected format {FORMAT})")
    return ckpt


# the BatchNorm that lfa(decoder_norm='auto') puts on FPN's and Linknet's decoder feature
LFA_DECODER_NORM_KEY = re.compile(r"\.lfa\.transform\.norm\.[a-z_]+$")


def without_lfa_decoder_norm(spec: str) -> str:
    """``spec`` with ``decoder_norm='none'`` on every lfa term that does not set it: how
    fpn/linknet + lfa models were built before lfa had ``decoder_norm``."""
    parsed = parse_spec(spec)
    plugins = tuple(Term(t.name, t.params + (("decoder_norm", "none"),))
                    if t.name == "lfa" and "decoder_norm" not in t.kwargs else t
                    for t in parsed.plugins)
    return str(Spec(parsed.arch, plugins))


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """The trained model of ``ckpt``. A checkpoint written before lfa had ``decoder_norm``
    lacks the BatchNorm that ``auto`` now adds on FPN and Linknet: it is rebuilt as it was
    trained (``decoder_norm='none'``), and ``ckpt["spec"]`` is rewritten to say so."""
    def build():
        return create_model(ckpt["spec"], in_channels=ckpt["in_channels"],
                            classes=len(ckpt["class_names"]))

    try:
        model = build()
        missing = set(model.state_dict()) - set(ckpt["model"])
        if missing and all(LFA_DECODER_NORM_KEY.search(k) for k in missing):
            ckpt["spec"] = without_lfa_decoder_norm(ckpt["spec"])
            model = build()
        model.load_state_dict(ckpt["model"])
    except (SpecError, RuntimeError) as e:
        raise DataError(f"checkpoint does not rebuild: {' '.join(str(e).split())[:300]}") from None
    return model
