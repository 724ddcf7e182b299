"""Reading image files: TIFF (plain, ImageJ, OME; pages, hyperstacks, files over 4 GB), MRC,
and Pillow's formats (PNG, JPEG, BMP). An image is (H, W) or (H, W, C), a stack
(pages, H, W[, C]); :func:`read_planes` gives a stack's images one at a time. Also the files'
axes, pixel types and pixel sizes (calibration), from their headers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ..errors import DataError
from .mrc import (is_mrc, mrc_calibration, mrc_layout, mrc_pixels, mrc_planes, mrc_shape,
                  open_mrc)


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
