"""MRC files (IMOD, SerialEM, cryo-EM tools: .mrc, .st, .ali, .rec, .map, .mrcs), read with
mrcfile from a memory map: one image is (H, W), a stack of sections or a volume (Z, H, W), a
stack of volumes (V, Z, H, W); their sections are read one at a time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

MRC_SUFFIXES = (".mrc", ".mrcs", ".st", ".ali", ".rec", ".map")
IMOD_STAMP = 1146047817  # "IMOD" in the header's bytes 152-155: its flags follow
ANGSTROMS_PER_CM = 1e8


def is_mrc(path: Path) -> bool:
    return path.suffix.lower() in MRC_SUFFIXES


@contextmanager
def open_mrc(path: Path):
    """mrcfile's read-only memory map of ``path`` (strict: a file that breaks the format
    raises, for data.py's one-line error)."""
    import mrcfile

    with mrcfile.mmap(path, mode="r") as mrc:
        yield mrc


def _signed_bytes(header) -> bool:
    """Whether mode-0 bytes are signed. The MRC2014 standard says signed; IMOD, which writes
    most EM stacks (SerialEM too), writes unsigned bytes and stamps its header, setting flag 1
    of its flags (byte 156) only for signed ones."""
    order = header.nx.dtype.byteorder
    stamp, flags = np.frombuffer(header.extra2.tobytes()[40:48],  # header bytes 152-159
                                 np.dtype("i4").newbyteorder(order))
    return stamp != IMOD_STAMP or bool(flags & 1)


def mrc_pixels(mrc) -> np.ndarray:
    """The file's data as a memory map, (H, W) or (..., H, W): IMOD's unsigned bytes as
    uint8 (mrcfile reads every mode-0 file as int8)."""
    data = mrc.data
    if data.dtype.kind == "i" and data.dtype.itemsize == 1 and not _signed_bytes(mrc.header):
        data = data.view(np.uint8)
    return data


def mrc_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(H, W) of one image, (pages, H, W) of a stack or volume (the sections of a stack of
    volumes counted together), for data of ``shape``."""
    return tuple(shape) if len(shape) == 2 else (int(np.prod(shape[:-2])), *shape[-2:])


def mrc_shape(path: Path) -> tuple[int, ...]:
    """:func:`mrc_layout` of the file's data, from its header (no pixels read)."""
    with open_mrc(path) as mrc:
        return mrc_layout(mrc.data.shape)


def mrc_planes(path: Path) -> Iterator[np.ndarray]:
    """The file's (H, W) sections, one at a time (each copied out of the memory map)."""
    with open_mrc(path) as mrc:
        data = mrc_pixels(mrc)
        for plane in data.reshape(-1, *data.shape[-2:]):
            yield np.array(plane)


def mrc_calibration(path: Path) -> dict | None:
    """The pixel size (the header's voxel size, in Å) as ``tifffile.imwrite`` keywords in
    pixels per centimetre, with ``spacing``, the Z size in cm, for a stack or volume; None
    where the header gives no pixel size (0)."""
    with open_mrc(path) as mrc:
        size, sections = mrc.voxel_size, mrc.data.ndim > 2
        x, y, z = float(size.x), float(size.y), float(size.z)
    if not (np.isfinite(x) and np.isfinite(y) and x > 0 and y > 0):
        return None
    calibration = {"resolution": (ANGSTROMS_PER_CM / x, ANGSTROMS_PER_CM / y),
                   "resolutionunit": 3}
    if sections and np.isfinite(z) and z > 0:
        calibration["spacing"] = z / ANGSTROMS_PER_CM
    return calibration
