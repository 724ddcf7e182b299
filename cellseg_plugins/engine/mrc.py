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


def mrc_geometry(path: Path) -> dict:
    """What places an MRC file's pixels in space, for a file of the same pixels to lie on
    them: its voxel size (x, y, z in Å), origin (Å), start indices and space group (0: a stack
    of images, 1: a volume, 401: a stack of volumes)."""
    with open_mrc(path) as mrc:
        header = mrc.header
        return {"voxel_size": tuple(float(v) for v in mrc.voxel_size.item()),
                "origin": tuple(float(v) for v in header.origin.item()),
                "nstart": (int(header.nxstart), int(header.nystart), int(header.nzstart)),
                "ispg": int(header.ispg)}


def write_mrc(path: Path, planes: Iterator[np.ndarray], shape: tuple[int, ...], dtype,
              geometry: dict | None = None, labels: list[str] = ()) -> None:
    """An MRC file of ``shape`` ((H, W), (Z, H, W) or (V, Z, H, W)) and ``dtype`` (int8: mode
    0, uint16: mode 6, ...) written from ``planes``, its (H, W) sections in stored order, one
    at a time through mrcfile's memory map; ``geometry`` (:func:`mrc_geometry`'s keys, any of
    them) in its header, ``labels`` (at most 10 of 80 ASCII characters) as its text labels;
    the header's minimum, maximum, mean and RMS from the pixels written."""
    import mrcfile

    dtype = np.dtype(dtype)
    total, squares, low, high, count = 0.0, 0.0, np.inf, -np.inf, 0
    with mrcfile.new_mmap(path, shape, mrc_mode=mrcfile.utils.mode_from_dtype(dtype),
                          overwrite=True) as mrc:
        sections = mrc.data.reshape(-1, *shape[-2:])
        for k, plane in enumerate(planes):
            sections[k] = plane
            values = plane.astype(np.float64)
            total, squares = total + values.sum(), squares + (values ** 2).sum()
            low, high, count = min(low, values.min()), max(high, values.max()), count + values.size
        geometry = geometry or {}
        if "voxel_size" in geometry:
            mrc.voxel_size = geometry["voxel_size"]
        if "origin" in geometry:
            mrc.header.origin = geometry["origin"]
        if "nstart" in geometry:
            mrc.nstart = geometry["nstart"]
        if geometry.get("ispg") is not None and len(shape) == 3:
            mrc.header.ispg = geometry["ispg"]  # a stack of sections stays one, a volume too
        mean = total / max(count, 1)
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = low, high, mean
        mrc.header.rms = np.sqrt(max(squares / max(count, 1) - mean ** 2, 0.0))
        mrc.header.nlabl = len(labels)
        for k, text in enumerate(labels):
            mrc.header.label[k] = text.encode("ascii")[:80].ljust(80)
