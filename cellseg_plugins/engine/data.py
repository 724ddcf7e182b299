"""Data sets: built-in synthetic data, ssTEM (fetched and verified), users' image/mask folders.

Everything is loaded as *source images* (H, W) or (H, W, C) float32 in [0, 1] with integer masks;
crops, folds and augmentation work on source indices, so splits never share a source image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from ..errors import DataError
from .mrc import (MRC_SUFFIXES, is_mrc, mrc_calibration, mrc_layout, mrc_pixels, mrc_planes,
                  mrc_shape, open_mrc)
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import synthetic_dataset


SSTEM_URL = "https://raw.githubusercontent.com/unidesigner/groundtruth-drosophila-vnc/master"
# grey level → class, for the papers' two class maps (../shared/data/sstem/SOURCE.md)
SSTEM_MAPS = {
    "sstem5": (("membrane", "mitochondria", "synapse", "extracellular", "intracellular"),
               {0: 0, 32: 0, 64: 0, 96: 0, 128: 0, 191: 1, 223: 2, 159: 3, 255: 4}),
    "sstem4": (("membrane", "mitochondria", "synapse", "cytoplasm"),
               {0: 0, 32: 0, 64: 0, 96: 0, 128: 0, 191: 1, 223: 2, 159: 3, 255: 3}),
}
MAX_CLASSES = 255  # labels are written as uint8 images
IMAGE_DIRS = ("images", "image", "imgs", "img", "raw", "x", "imagesTr")  # imagesTr: nnU-Net's
MASK_DIRS = ("masks", "mask", "labels", "label", "gt", "annotations", "y", "labelsTr")
SUFFIXES = (".png", ".tif", ".tiff")  # masks and labels: lossless formats
IMAGE_SUFFIXES = (*SUFFIXES, ".jpg", ".jpeg", ".bmp", *MRC_SUFFIXES)


@dataclass
class SourceSet:
    """Source images (float32 in [0, 1], (H, W) or (H, W, C)), masks (int64 (H, W)), names,
    and each image's pixel size in nm where known (:func:`pixel_nm`; empty: none known)."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    class_names: tuple[str, ...]
    names: list[str] = field(default_factory=list)
    pixel_nm: list[float | None] = field(default_factory=list)

    @property
    def in_channels(self) -> int:
        return 1 if self.images[0].ndim == 2 else self.images[0].shape[2]

    @property
    def pixel_sizes(self) -> list[float | None]:
        """Each image's pixel size in nm, None where unknown."""
        return self.pixel_nm or [None] * len(self.images)


def data_root() -> Path:
    """Where fetched data sets live: $CELLSEG_DATA, else the platform cache directory."""
    if os.environ.get("CELLSEG_DATA"):
        return Path(os.environ["CELLSEG_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cellseg"


# ---------------------------------------------------------------- ssTEM: fetch and verify


def sstem_checksums() -> dict[str, str]:
    text = resources.files("cellseg_plugins").joinpath("data/sstem.sha256.txt").read_text()
    return {line.split()[1]: line.split()[0] for line in text.splitlines() if line.strip()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sstem(root: Path | None = None, source: str | None = None, progress=None) -> Path:
    """Download (or with ``source`` a local folder, copy) ssTEM into ``root/sstem``.

    Every file is checked against the SHA-256 list shipped in the package; a missing or
    corrupt file aborts the fetch and nothing is left behind (files go to a temporary folder
    that is renamed into place only when all are verified). A copy already in place is kept
    when every file's checksum matches, else fetched again.
    """
    target = (root or data_root()) / "sstem"
    sums = sstem_checksums()
    if source is not None and "://" not in source and not Path(source).is_dir():
        raise DataError(f"--from {source!r}: no such folder (give a local copy of ssTEM "
                        "with stack1/raw and stack1/labels, or a URL)")
    if target.is_dir() and all((target / p).is_file() and _sha256(target / p) == digest
                               for p, digest in sums.items()):
        return target
    made_root = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sstem-", dir=target.parent))
    try:
        for i, (rel, digest) in enumerate(sorted(sums.items())):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source is not None and "://" not in source:
                src = Path(source) / rel
                if not src.is_file():
                    raise DataError(f"{src}: missing from the local copy")
                shutil.copyfile(src, dest)
            else:
                url = f"{(source or SSTEM_URL).rstrip('/')}/{rel}"
                try:
                    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
                        shutil.copyfileobj(r, f)
                except OSError as e:
                    raise DataError(f"could not download {url}: {e}") from None
            if _sha256(dest) != digest:
                raise DataError(f"{rel}: SHA-256 mismatch (corrupt or partial copy)")
            if progress:
                progress(i + 1, len(sums))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
            if made_root and not any(target.parent.iterdir()):
                target.parent.rmdir()  # a failed fetch leaves no trace
    return target


# "a resolution of 4.6 x 4.6 nm/pixel and section thickness of 45-50 nm" (the data set's
# README); its TIFFs carry no calibration
SSTEM_PIXEL_NM = 4.6


def load_sstem(classes: str = "sstem5", root: Path | None = None) -> SourceSet:
    if classes not in SSTEM_MAPS:
        raise DataError(f"--classes {classes!r}: expected one of {', '.join(SSTEM_MAPS)}")
    base = (root or data_root()) / "sstem"
    raw = sorted((base / "stack1" / "raw").glob("*.tif"))
    if not raw:
        raise DataError(f"ssTEM not found under {base}; run 'cellseg data fetch sstem' "
                        "(or 'cellseg data fetch sstem --from PATH' for a local copy)")
    names, value_map = SSTEM_MAPS[classes]
    images, masks = [], []
    for path in raw:
        label = base / "stack1" / "labels" / f"labels{int(path.stem):08d}.png"
        images.append(_to_unit(read_image(path), path))
        masks.append(map_values(read_image(label, mask=True), value_map, label))
    return SourceSet(images, masks, names, [p.stem for p in raw], [SSTEM_PIXEL_NM] * len(raw))


# ---------------------------------------------------------------- users' folders


GREY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _pil_array(im: Image.Image, mask: bool) -> np.ndarray:
    """A PNG's pixels: grey as (H, W) (grey with alpha too: alpha is dropped), RGB(A) as
    (H, W, 3|4); an image's palette or other colour space as RGB (a mask's palette indices
    are its values)."""
    if im.mode == "LA":
        return np.asarray(im.getchannel("L"))
    if im.mode in (*GREY_MODES, "RGB", "RGBA") or (mask and im.mode == "P"):
        return np.asarray(im)
    return np.asarray(im.convert("RGB"))


def _tiff_layout(a: np.ndarray, axes: str) -> np.ndarray:
    """A TIFF series' pixels as (pages, H, W[, C]) or (H, W[, C]): its samples axis (S: RGB(A),
    or grey + alpha, which loses alpha) last, as in PNGs; the axes before Y (pages, Z, T, C)
    flattened into one pages axis, each page an image."""
    if "S" in axes:
        a = np.moveaxis(a, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
        if a.shape[-1] == 2:
            a, axes = a[..., 0], axes[:-1]
    lead = axes.index("Y") if "Y" in axes else 0
    return a.reshape(-1, *a.shape[lead:]) if lead > 1 else a


@contextmanager
def _reading(path: Path):
    """Any error of the block as DataError "PATH: unreadable image (ErrorType: its message's
    first line)" (the message says what is missing, e.g. a codec for a compressed TIFF)."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        text = (str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)).strip()
        text = text.splitlines()[0][:200] if text else ""
        raise DataError(f"{path}: unreadable image ({type(e).__name__}"
                        f"{': ' + text if text else ''})") from None


def _not_imagej_fallback(record: logging.LogRecord) -> bool:
    """False for tifffile's log line on an ImageJ stack it cannot read (it falls back to the
    first page), which :func:`_series` reports as DataError instead."""
    return "ImageJ series metadata invalid" not in record.getMessage()


def _series(f: tifffile.TiffFile, path: Path):
    """The TIFF's one image series (an image, or a stack of pages of one size; reduced-
    resolution pages are its levels); raises DataError for a file holding several (pages of
    different sizes, OME positions), of which only the first would be read, and for an ImageJ
    stack that tifffile cannot read whole or an uncompressed one cut short (truncated files:
    tifffile would give the first page, or fail on a later one)."""
    log = logging.getLogger("tifffile")
    log.addFilter(_not_imagej_fallback)
    try:
        f.series  # noqa: B018 (parsed once, here, and cached by tifffile)
    finally:
        log.removeFilter(_not_imagej_fallback)
    whole = f.series[0]
    images = (f.imagej_metadata or {}).get("images", 1) if f.is_imagej else 1
    found = int(np.prod(whole.shape[:whole.axes.index("Y")])) if "Y" in whole.axes else 1
    if images > found and whole.kind != "imagej":
        raise DataError(f"{path}: its ImageJ header describes a stack of {images} images, of "
                        f"which {found} can be read (a truncated or corrupted file): save the "
                        "stack again (e.g. with Fiji)")
    if whole.dataoffset is not None and whole.dataoffset + whole.nbytes > f.filehandle.size:
        raise DataError(f"{path}: the file ends before its pixels do ({f.filehandle.size} "
                        f"bytes, {whole.dataoffset + whole.nbytes} needed): a truncated file")
    if len(f.series) > 1:
        shapes = ", ".join("×".join(map(str, s.shape)) for s in f.series)
        raise DataError(f"{path}: {len(f.series)} image series in one TIFF ({shapes}); "
                        "cellseg reads a file's one image or one stack of same-size pages: "
                        "save each series as its own file")
    return f.series[0]


_PIL_LIMIT = threading.Lock()


@contextmanager
def _open_pil(path: Path):
    """``Image.open(path)`` without Pillow's decompression-bomb limit (a warning past 89
    megapixels, an error past 179: a 14 000² montage of EM sections), which guards servers
    against uploaded files, not a user's own micrographs. Pillow checks its module-wide limit
    while it opens a PNG/JPEG/BMP (not while it decodes), so the limit is lifted only for that
    header read, under a lock, and is the user's again while the pixels are decoded. A file
    whose extension no reader knows (a CZI or ND2 file) raises DataError naming it."""
    suffix = path.suffix.lower()
    if suffix and suffix not in Image.registered_extensions():
        raise DataError(f"{path}: cellseg does not read {suffix} files; it reads TIFF, MRC, "
                        "PNG, JPEG, BMP and Pillow's other formats: save the image as TIFF "
                        "(e.g. with Fiji)")
    with _PIL_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with im:
        yield im


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def read_image(path: Path, mask: bool = False) -> np.ndarray:
    """(pages, H, W[, C]) for multi-page TIFF stacks and MRC stacks or volumes, else
    (H, W[, C]); raises DataError."""
    with _reading(path):
        if is_mrc(path):
            with open_mrc(path) as mrc:
                data = mrc_pixels(mrc)
                return np.array(data.reshape(mrc_layout(data.shape)))
        if _is_tiff(path):
            with tifffile.TiffFile(path) as f:
                series = _series(f, path)
                return _tiff_layout(series.asarray(), series.axes)
        with _open_pil(path) as im:
            return _pil_array(im, mask)


def _plane_pages(series) -> list | None:
    """The TIFF pages of ``series`` if each holds one image (a stack of sections, an ImageJ
    hyperstack, an RGB stack), in the order of :func:`read_image`'s pages; None otherwise (one
    page; samples split over pages; an ImageJ file over 4 GB, stored as one page)."""
    pages, page = list(series.pages), series.keyframe
    lead = len(series.shape) - len(page.shape)
    if (len(pages) < 2 or lead < 1 or not series.axes.endswith(page.axes)
            or "S" in series.axes[:lead] or tuple(series.shape[lead:]) != tuple(page.shape)
            or len(pages) != int(np.prod(series.shape[:lead])) or None in pages):
        return None
    return pages


def _contiguous_planes(series) -> tuple[int, tuple[int, ...], str] | None:
    """(pages, stored shape of one, its axes) of a stack stored as one run of uncompressed
    bytes in one page (as ImageJ writes files over 4 GB), whose pages of :func:`read_image`
    lie one after the other in the file; None for other layouts (compressed, scattered,
    planar samples, one image)."""
    axes = series.axes
    if series.dataoffset is None or "Y" not in axes or "S" in axes[:axes.index("Y")]:
        return None
    lead = axes.index("Y")
    layout = _tiff_layout(np.broadcast_to(np.bool_(False), series.shape), axes).shape
    if lead == 0 or not is_stack(layout):
        return None
    return int(np.prod(series.shape[:lead])), tuple(series.shape[lead:]), axes[lead:]


def read_planes(path: Path) -> Iterator[np.ndarray]:
    """The (H, W[, C]) images of :func:`read_image`'s array (its pages, or the image), read one
    at a time where the file allows: a TIFF whose pages each hold one image is decoded page by
    page, an uncompressed stack stored in one page (ImageJ's files over 4 GB) a section at a
    time from its bytes, an MRC file a section at a time from its memory map, so a stack of
    sections is never whole in memory. Raises DataError."""
    if is_mrc(path):
        planes = mrc_planes(path)
        while True:
            with _reading(path):
                plane = next(planes, None)
            if plane is None:
                return
            yield plane
    if not _is_tiff(path):
        yield read_image(path)
        return
    with _reading(path):
        f = tifffile.TiffFile(path)
    with f:
        with _reading(path):
            series = _series(f, path)
            pages = _plane_pages(series)
            contiguous = None if pages else _contiguous_planes(series)
            whole = (None if pages or contiguous
                     else _tiff_layout(series.asarray(), series.axes))
        if contiguous:
            (count, shape, axes), dtype = contiguous, series.dtype.newbyteorder(f.byteorder)
            size = int(np.prod(shape))
            for k in range(count):
                with _reading(path):  # in native byte order, as tifffile decodes
                    plane = f.filehandle.read_array(
                        dtype, size, offset=series.dataoffset + k * size * dtype.itemsize)
                    plane = _tiff_layout(plane.reshape(shape), axes)
                yield plane
            return
        if whole is not None:
            yield from (whole if is_stack(whole.shape) else [whole])
            return
        for page in pages:
            with _reading(path):
                plane = _tiff_layout(page.asarray(), page.axes)
            yield plane


def is_stack(shape: tuple[int, ...]) -> bool:
    """A multi-page TIFF (pages, H, W[, C]) rather than one image (H, W[, C])."""
    return (len(shape) == 3 and shape[-1] not in (3, 4)) or len(shape) == 4


def image_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """(pages, channels) of an image of this shape (RGBA counts as RGB: alpha is dropped)."""
    page = shape[1:] if is_stack(shape) else shape
    return (shape[0] if is_stack(shape) else 1), (1 if len(page) == 2 else min(page[-1], 3))


def image_shape(path: Path) -> tuple[int, ...]:
    """The shape :func:`read_image` returns for ``path``, from the file's header only (no pixel
    data is decoded); raises DataError."""
    with _reading(path):
        if is_mrc(path):
            return mrc_shape(path)
        if _is_tiff(path):
            with tifffile.TiffFile(path) as f:
                series = _series(f, path)
                pixels = np.broadcast_to(np.bool_(False), series.shape)  # no memory
                return _tiff_layout(pixels, series.axes).shape
        with _open_pil(path) as im:
            (w, h), grey = im.size, im.mode in (*GREY_MODES, "LA")
            return (h, w) if grey else (h, w, 4 if im.mode == "RGBA" else 3)


def pixel_kind(path: Path) -> str:
    """NumPy's dtype kind of an image file's pixels ('u', 'i', 'f', 'c', ...; header only)."""
    if is_mrc(path):
        with open_mrc(path) as mrc:
            return mrc_pixels(mrc).dtype.kind
    if _is_tiff(path):
        with tifffile.TiffFile(path) as f:
            return _series(f, path).dtype.kind
    with _open_pil(path) as im:
        return {"F": "f", "I": "i"}.get(im.mode, "u")


def check_pixel_type(dtype: np.dtype, name) -> None:
    """Raise DataError unless pixels of ``dtype`` are bool, integer or float (not complex,
    dates, text or objects)."""
    if np.dtype(dtype).kind not in "biuf":
        hint = " (of a complex image, pass its magnitude)" if np.dtype(dtype).kind == "c" else ""
        raise DataError(f"{name}: pixels of type {np.dtype(dtype)}; expected integer or "
                        f"floating-point pixels{hint}")


def plane_axes(path: Path) -> tuple[str, tuple[int, ...]]:
    """The axes in front of an image file's planes, as the file has them, and their sizes:
    ("ZC", (Z, C)) of a ZCYX TIFF hyperstack, ("TZ", (V, Z)) of an MRC stack of volumes,
    ("Z", (sections,)) of an MRC stack or volume, ("I", (pages,)) of a plain TIFF stack,
    ("", ()) of one image (header only). Letters are tifffile's (an ImageJ file's are among
    T, Z and C)."""
    if is_mrc(path):
        with open_mrc(path) as mrc:
            front = tuple(mrc.data.shape[:-2])
        return "TZ"[2 - len(front):], front
    if not _is_tiff(path):
        return "", ()
    with tifffile.TiffFile(path) as f:
        series = _series(f, path)
        front = series.axes[:series.axes.index("Y")] if "Y" in series.axes else ""
        kept = [(axis, n) for n, axis in zip(series.shape, front) if axis != "S"]
    return "".join(axis for axis, _ in kept), tuple(n for _, n in kept)


_CM_PER_UNIT = {"nm": 1e-7, "nanometer": 1e-7, "µm": 1e-4, "um": 1e-4, "micron": 1e-4,
                "micrometer": 1e-4, "mm": 0.1, "millimeter": 0.1, "cm": 1.0, "centimeter": 1.0,
                "m": 100.0, "meter": 100.0, "inch": 2.54}


def pixel_calibration(path: Path) -> dict | None:
    """The pixel size of an image file as ``tifffile.imwrite`` keywords, {resolution: (x, y)
    pixels per unit, resolutionunit: TIFF ResolutionUnit (1 none, 2 inch, 3 cm)}, with
    ``spacing``, the step between planes in cm, where the file gives one: a TIFF's resolution
    tags (its first page's), where an ImageJ file's length unit (its description's ``unit``:
    µm, nm, ...; ImageJ writes ResolutionUnit "none" beside it) is turned into centimetres,
    the unit every TIFF reader (Fiji's included) knows, and its ``spacing`` (Z step, in that
    unit) kept; an MRC file's voxel size (Å) in pixels per centimetre, its Z size as the
    spacing of a stack or volume. None for other files and where the file gives no size
    (header only)."""
    if is_mrc(path):
        return mrc_calibration(path)
    if not _is_tiff(path):
        return None
    with tifffile.TiffFile(path) as f:
        page, imagej = f.pages.first, f.imagej_metadata or {}
        if "XResolution" not in page.tags or "YResolution" not in page.tags:
            return None
        try:
            (x, y), unit = page.get_resolution(), int(page.resolutionunit)
        except (ArithmeticError, ValueError):  # a zero denominator, an unknown unit
            return None
    if not all(np.isfinite(v) and v > 0 for v in (x, y)):
        return None
    name = str(imagej.get("unit", "")).replace("\\u00B5", "µ")
    cm = _CM_PER_UNIT.get(name.strip().lower().rstrip("s")) if unit == 1 else None
    if not cm:
        return {"resolution": (x, y), "resolutionunit": unit}
    calibration = {"resolution": (x / cm, y / cm), "resolutionunit": 3}
    try:
        spacing = float(imagej.get("spacing", 0)) * cm
    except (TypeError, ValueError):
        spacing = 0.0
    return {**calibration, "spacing": spacing} if np.isfinite(spacing) and spacing > 0 \
        else calibration


def calibration_nm(calibration: dict | None) -> float | None:
    """The pixel side in nm (the geometric mean of x and y) of a :func:`pixel_calibration`
    that is a length; None otherwise (no calibration, dpi, no unit)."""
    if not calibration or calibration["resolutionunit"] != 3:
        return None
    x, y = calibration["resolution"]  # pixels per cm
    return 1e7 / float(np.sqrt(x * y))


def pixel_nm(path: Path) -> float | None:
    """The pixel side of an image file in nm (:func:`calibration_nm`), None where unknown."""
    return calibration_nm(pixel_calibration(path))


def common_pixel_nm(sizes: list[float | None], tolerance: float = 0.02) -> float | None:
    """The pixel size (nm) that images of ``sizes`` (:func:`pixel_nm` each) share: their
    median, where every one is known and within ``tolerance`` of it; None otherwise."""
    if not sizes or any(size is None for size in sizes):
        return None
    median = float(np.median(sizes))
    return median if all(abs(size / median - 1) <= tolerance for size in sizes) else None


def describe_pixel_sizes(sizes: list[float | None]) -> str:
    """'4.6 nm', or how many images have each pixel size ('4 nm: 12, 8 nm: 3, unknown: 2')."""
    counts: dict[str, int] = {}
    for size in sizes:
        key = f"{size:.3g} nm" if size else "unknown"
        counts[key] = counts.get(key, 0) + 1
    return next(iter(counts)) if len(counts) == 1 else \
        ", ".join(f"{key}: {n}" for key, n in counts.items())


def mixed_pixel_sizes(sizes: list[float | None]) -> str | None:
    """A warning where images of ``sizes`` have more than one known pixel size (beyond 2 %):
    a model trained on them learns each structure at several sizes in pixels, and keeps no
    pixel size to check predict's inputs against; None otherwise."""
    known = [size for size in sizes if size]
    if len(known) < 2 or common_pixel_nm(known):
        return None
    return (f"training images of several pixel sizes ({describe_pixel_sizes(sizes)}): the "
            "model learns each structure at several sizes and keeps no pixel size for predict "
            "to check; rescale them to one (or give --pixel-size if the files are wrong)")


def unit_range(a: np.ndarray, name) -> tuple[float, float]:
    """(offset, span) that maps image ``a`` (uint8/uint16 by their range, other numbers by
    their min/max) to [0, 1] as ``(a - offset) / span``; span 0 for a constant image. Reads the
    pixels without copying them. An image ``name`` with NaN or infinite pixels (min/max scaling
    would make every pixel NaN), or pixels that are not numbers (:func:`check_pixel_type`),
    raises DataError."""
    check_pixel_type(a.dtype, name)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]  # alpha is dropped before scaling
    if a.dtype == np.uint8:
        return 0.0, 255.0
    if a.dtype == np.uint16:
        return 0.0, 65535.0
    lo, hi = (float(np.float32(v)) for v in (a.min(), a.max()))  # float32: as it is scaled
    if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN is min and max; ±inf is one of them
        bad = ~np.isfinite(a.astype(np.float32))
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{name}: {int(bad.sum())} pixel(s) are NaN or infinite (the first at "
                        f"{where}: {a.astype(np.float32)[where]}); replace them with a finite "
                        "value")
    return lo, hi - lo


def scale_to_unit(a: np.ndarray, offset: float, span: float) -> np.ndarray:
    """float32 ``(a - offset) / span`` (zeros when span is 0); RGBA loses alpha. ``a`` may be
    a tile of the image whose :func:`unit_range` gave ``offset`` and ``span``."""
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    a = a.astype(np.float32)
    return (a - offset) / span if span > 0 else np.zeros_like(a)


def _to_unit(a: np.ndarray, name) -> np.ndarray:
    """uint8/uint16/float → float32 in [0, 1] (:func:`unit_range`); RGBA loses alpha."""
    return scale_to_unit(a, *unit_range(a, name))


def fit_channels(image: np.ndarray, channels: int, name) -> np.ndarray:
    """A float image (H, W) or (H, W, 3) from :func:`_to_unit` as ``channels`` channels: grey
    is repeated into RGB for a colour model; RGB whose channels are all equal (grey saved as
    RGB) is taken as grey for a grey model; a colour image for a grey model raises DataError."""
    have = 1 if image.ndim == 2 else image.shape[-1]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image[..., None], 3, axis=-1)
    if have == 3 and channels == 1 and (image == image[..., :1]).all():
        return image[..., 0]
    raise DataError(f"{name}: {have} channel(s), the model expects {channels}"
                    + (" (a colour image, not grey saved as RGB)" if have == 3 else ""))


def parse_class_map(text: str) -> tuple[tuple[str, ...], dict[int, int]]:
    """'0:background,128:nucleus,255:membrane' → (names, {grey: class index})."""
    names: list[str] = []
    value_map: dict[int, int] = {}
    for item in text.split(","):
        value, sep, name = item.strip().partition(":")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise DataError(f"--class-map item {item.strip()!r}: expected VALUE:NAME, "
                            "e.g. '0:background,255:cell'")
        name = name.strip()
        if name not in names:
            names.append(name)
        value_map[int(value)] = names.index(name)
    return tuple(names), value_map


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` (PNG, TIFF, JPEG, BMP, MRC), sorted; hidden files (macOS'
    ``._name.png`` resource forks, ...) are not images."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith(".") and p.is_file())


def map_values(mask: np.ndarray, value_map: dict[int, int] | None, path: Path) -> np.ndarray:
    """(H, W) int64 class indices of a mask through ``value_map``. A colour mask is taken only
    if it is grey (its colour channels equal; alpha is ignored): a colour-coded one is refused,
    as its first channel alone would merge classes."""
    if mask.ndim == 3:
        colour = mask[..., :3]
        if not (colour == colour[..., :1]).all():
            y, x = np.argwhere((colour != colour[..., :1]).any(-1))[0]
            raise DataError(f"{path}: a colour-coded mask (pixel ({y}, {x}) is "
                            f"{tuple(int(v) for v in colour[y, x])}); masks hold one class "
                            "index or grey level per pixel: save it as grey levels and name "
                            "them with --class-map")
        mask = mask[..., 0]
    if mask.dtype.kind == "f" and not np.array_equal(mask, np.round(mask)):
        bad = float(mask[mask != np.round(mask)].flat[0])
        raise DataError(f"{path}: mask value {bad:g} is not an integer (masks hold class "
                        "indices or grey levels, not probabilities)")
    if mask.min() < 0:
        raise DataError(f"{path}: mask value {int(mask.min())} is negative (masks hold class "
                        "indices or grey levels ≥ 0)")
    if value_map is None:
        return mask.astype(np.int64)
    lut = np.full(max(int(mask.max()), max(value_map)) + 1, -1, dtype=np.int64)
    for value, index in value_map.items():
        lut[value] = index
    out = lut[mask]
    if (out < 0).any():
        bad = int(mask[out < 0][0])
        raise DataError(f"{path}: mask value {bad} is not in the class map "
                        f"(mapped: {', '.join(str(v) for v in sorted(value_map))})")
    return out


def _find_dir(root: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` that is a folder of ``root``, in any letter case."""
    folders = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}
    for name in names:
        if name.lower() in folders:
            return folders[name.lower()]
    raise DataError(f"{root}: no {what} folder (expected one of {', '.join(names)})")


MASK_ENDINGS = ("", "_mask", "_masks", "_label", "_labels", "_gt", "_seg", "_segmentation",
                 "-mask", "-label")


def mask_of(stem: str, masks_by_stem: dict[str, Path]) -> Path | None:
    """The mask of the image named ``stem``: the same stem, or it with a mask suffix
    (``a_mask``, ``a_label``, ``a_gt``, …), or, for nnU-Net's channel-numbered images
    (``a_0000``), ``a``; the first that exists."""
    bases = (stem, stem[:-5]) if stem.endswith("_0000") else (stem,)
    return next((masks_by_stem[b + s] for b in bases for s in MASK_ENDINGS
                 if b + s in masks_by_stem), None)


def load_folder(root: Path, class_map: str | None = None) -> SourceSet:
    """An image folder and a mask folder paired by file stem (:func:`mask_of`); TIFF stacks
    give one source per page."""
    if not root.is_dir():
        raise DataError(f"--data {str(root)!r}: not 'synthetic', 'sstem' or an existing folder")
    image_dir, mask_dir = _find_dir(root, IMAGE_DIRS, "image"), _find_dir(root, MASK_DIRS, "mask")
    masks_by_stem = {p.stem: p for p in image_files(mask_dir)}
    names, value_map = parse_class_map(class_map) if class_map else ((), None)
    images, masks, stems, sizes = [], [], [], []
    for path in image_files(image_dir):
        mask_path = mask_of(path.stem, masks_by_stem)
        if mask_path is None:
            raise DataError(f"{path}: no mask named {path.stem!r} in {mask_dir} (nor "
                            f"{path.stem}_mask, _label, _gt, …)")
        if mask_path.suffix.lower() in (".jpg", ".jpeg"):
            raise DataError(f"{mask_path}: a JPEG mask (JPEG's compression blurs class values "
                            "into each other); save masks as PNG or TIFF")
        image, mask = read_image(path), read_image(mask_path, mask=True)
        stack = is_stack(image.shape)
        pages = list(zip(image, mask)) if stack else [(image, mask)]
        sizes += [pixel_nm(path)] * len(pages)
        for k, (im, ms) in enumerate(pages):
            ms = map_values(ms, value_map, mask_path)
            if im.shape[:2] != ms.shape[:2]:
                raise DataError(f"{path}: image size {im.shape[:2]} differs from mask size "
                                f"{ms.shape[:2]}")
            images.append(_to_unit(im, path))
            masks.append(ms)
            stems.append(f"{path.stem}[{k}]" if stack else path.stem)
    if not images:
        raise DataError(f"{image_dir}: no PNG, TIFF, MRC, JPEG or BMP images")
    if len({im.ndim for im in images}) > 1:  # grey and colour: all as colour
        images = [fit_channels(im, 3, name) for im, name in zip(images, stems)]
    if not names:
        names = index_names(masks, mask_dir)
    if len(names) > MAX_CLASSES:
        raise DataError(f"{mask_dir}: {len(names)} classes, more than the {MAX_CLASSES} a label "
                        "image holds; one value per object is an instance mask, and cellseg "
                        "segments classes: map the values to classes with --class-map")
    return SourceSet(images, masks, names, stems, sizes)


def index_names(masks: list[np.ndarray], mask_dir: Path) -> tuple[str, ...]:
    """class0 … classK for masks whose values are class indices (K the largest). Values that
    would leave most of those classes empty are grey levels (0/255 would make 256 classes,
    254 of them empty): DataError asks for a --class-map."""
    top = max(int(m.max()) for m in masks)
    counts = sum(np.bincount(m.ravel(), minlength=top + 1) for m in masks)
    values = np.flatnonzero(counts).tolist()
    empty = values[-1] + 1 - len(values)
    if empty > len(values):
        shown = ", ".join(str(v) for v in values[:8]) + (", …" if len(values) > 8 else "")
        example = ",".join(f"{v}:class{i}" for i, v in enumerate(values[:3]))
        raise DataError(f"{mask_dir}: mask values {shown} would make {values[-1] + 1} classes, "
                        f"{empty} of them empty; map them with --class-map, e.g. '{example}'")
    return tuple(f"class{i}" for i in range(values[-1] + 1))


def load_data(data: str, classes: str | None = None, class_map: str | None = None,
              seed: int = 0) -> SourceSet:
    """'synthetic' (built in), 'sstem' (fetched) or a folder of images and masks.

    ``classes`` (sstem5 | sstem4) applies to sstem only, ``class_map`` to folders only.
    """
    if classes is not None and data != "sstem":
        raise DataError(f"--classes {classes!r} applies to --data sstem only; folders take "
                        "--class-map")
    if class_map is not None and data in ("synthetic", "sstem"):
        raise DataError(f"--class-map applies to image folders, not --data {data}")
    if data == "synthetic":
        images, masks = synthetic_dataset(n=20, size=256, seed=seed)
        return SourceSet(images, masks, SYNTHETIC_CLASSES, [f"synthetic{i:02d}" for i in range(20)])
    if data == "sstem":
        return load_sstem(classes or "sstem5")
    return load_folder(Path(data), class_map)


# ---------------------------------------------------------------- splits, crops, augmentation


def fold_split(n_sources: int, folds: int, fold: int) -> dict[str, list[int]]:
    """Split source indices: fold k tests on block k, validates on block k+1, trains on the rest.

    For ssTEM (20 sections, 5 folds) fold 0 tests on sections 0–3, validates on 4–7 and
    trains on 8–19: 12/4/4 sections = 192/64/64 crops of 256².
    """
    if folds < 3:
        raise DataError(f"--folds {folds}: need at least 3 (test, validation and training blocks)")
    if not 0 <= fold < folds:
        raise DataError(f"--fold {fold}: expected 0 … {folds - 1}")
    if n_sources < 3:
        raise DataError(f"{n_sources} source image(s): folds need at least 3 (one each for "
                        "test, validation and training)")
    if n_sources < folds:
        raise DataError(f"--folds {folds}: {n_sources} source images make at most "
                        f"{n_sources} folds (each fold tests on one block of images)")
    blocks = np.array_split(np.arange(n_sources), folds)
    test, val = blocks[fold].tolist(), blocks[(fold + 1) % folds].tolist()
    train = [i for i in range(n_sources) if i not in test and i not in val]
    return {"train": train, "val": val, "test": test}


def load_split(cfg) -> tuple[SourceSet, dict[str, list[int]]]:
    """The data and fold split of a run's configuration (``data``, ``classes``,
    ``class_map``, ``folds``, ``fold``, ``seed``): a bad data set, class map or fold count
    fails here in one line, before anything is written."""
    sources = load_data(cfg.data, cfg.classes, cfg.class_map, seed=cfg.seed)
    return sources, fold_split(len(sources.images), cfg.folds, cfg.fold)


IGNORE = -1  # mask value of pixels an evaluation crop leaves to an earlier crop


def crop_starts(size: int, crop: int) -> list[tuple[int, int]]:
    """(start, rows already covered) of the crops along one side: the non-overlapping grid,
    then, where ``crop`` does not divide ``size``, one crop flush with the far edge, whose
    first rows the grid's last crop covers already. Every pixel is in a crop."""
    starts = [(s, 0) for s in range(0, size - crop + 1, crop)]
    if size % crop:
        starts.append((size - crop, starts[-1][0] + 2 * crop - size))
    return starts


def check_crop(sources: SourceSet, indices: list[int], crop: int) -> None:
    """DataError naming the image with the smallest side, if that side is below ``crop``."""
    if indices:
        side, i = min((min(sources.masks[i].shape), i) for i in indices)
        if side < crop:
            h, w = sources.masks[i].shape
            raise DataError(f"--crop {crop}: image {sources.names[i]} is {h}×{w}; pass a "
                            f"--crop of at most {side}, the smallest side of these images")


class CropDataset(torch.utils.data.Dataset):
    """Crops covering every pixel of the given sources (:func:`crop_starts`), normalised;
    random rot90/flip if ``augment``. With ``count_once`` (validation and test sets) the
    pixels an edge crop shares with the grid are :data:`IGNORE` in its mask, so each pixel
    counts once.

    Item: ((C, crop, crop) float32, (crop, crop) int64). Augmentation is drawn from
    (seed, epoch, index), so runs are reproducible with any number of workers.
    """

    def __init__(self, sources: SourceSet, indices: list[int], crop: int, mean, std,
                 augment: bool = False, seed: int = 0, count_once: bool = False):
        self.sources, self.crop, self.augment, self.seed = sources, crop, augment, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.epoch = 0
        self.items = []
        check_crop(sources, indices, crop)
        for i in indices:
            h, w = sources.masks[i].shape
            self.items += [(i, y, x, (dy, dx) if count_once else (0, 0))
                           for y, dy in crop_starts(h, crop) for x, dx in crop_starts(w, crop)]

    def __len__(self) -> int:
        return len(self.items)

    def cut(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop k as it lies in its source: image (C, crop, crop) in [0, 1], mask (crop, crop)
        int64 (:data:`IGNORE` where an earlier crop counts the pixel)."""
        i, y, x, (dy, dx) = self.items[k]
        c = self.crop
        image = torch.from_numpy(np.ascontiguousarray(self.sources.images[i][y:y + c, x:x + c]))
        image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
        mask = torch.from_numpy(np.array(self.sources.masks[i][y:y + c, x:x + c]))
        mask[:dy], mask[:, :dx] = IGNORE, IGNORE
        return image, mask

    def __getitem__(self, k: int):
        image, mask = self.cut(k)
        if self.augment:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, k)) % 2**63)
            turns, flip = torch.randint(0, 4, (2,), generator=g).tolist()
            image, mask = torch.rot90(image, turns, (1, 2)), torch.rot90(mask, turns, (0, 1))
            if flip % 2:
                image, mask = image.flip(2), mask.flip(1)
        return ((image - self.mean) / self.std).contiguous(), mask.contiguous()


def channel_stats(sources: SourceSet, indices: list[int]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over all pixels of the given sources (the train split)."""
    pixels = np.concatenate([sources.images[i].reshape(-1, sources.in_channels) for i in indices])
    return pixels.mean(0).tolist(), np.maximum(pixels.std(0), 1e-6).tolist()


def class_shares(sources: SourceSet, indices: list[int] | None = None) -> np.ndarray:
    idx = range(len(sources.masks)) if indices is None else indices
    counts = sum(np.bincount(sources.masks[i].ravel(), minlength=len(sources.class_names))
                 for i in idx)
    return counts / counts.sum()
