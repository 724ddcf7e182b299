"""Label files as ``cellseg predict`` and the napari writer write them: TIFFs of uint8 class
indices in ImageJ's hyperstack format, so Fiji opens them with their axes and pixel size, with
the class names, spec and what made them in the file's ImageJ properties; or MRC files that lie
on their MRC images (voxel size, origin) in IMOD, ChimeraX or Amira, with the same properties
in their text labels."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tifffile

from .checkpoint import write_atomic
from .image_files import image_layout, is_stack, plane_axes
from .mrc import ANGSTROMS_PER_CM, is_mrc, mrc_geometry, open_mrc, write_mrc

IMAGEJ_AXES = "TZC"  # ImageJ's hyperstack axes in front of Y and X, in its order
LABEL_FORMATS = {"tif": ".tif", "mrc": ".mrc"}  # predict --format: suffix of its label files
MRC_TITLE = "cellseg labels:"  # an MRC label file's first text label starts so


def imagej_axes(letters: str) -> str | None:
    """ImageJ's letters for axes in front of a label file's planes that a file calls
    ``letters`` (tifffile's): T, Z and C kept where they are in ImageJ's order (T, Z, C), one
    axis of any other letter a Z (slices: a plain stack's pages, tifffile's I), other axes T,
    Z, C from the last (two: Z, C; three: T, Z, C); None for more than three, which ImageJ
    cannot hold."""
    if len(letters) > len(IMAGEJ_AXES):
        return None
    if len(letters) == 1:
        return letters if letters in "TC" else "Z"
    if set(letters) <= set(IMAGEJ_AXES) and len(set(letters)) == len(letters) and \
            list(letters) == sorted(letters, key=IMAGEJ_AXES.index):
        return letters
    return IMAGEJ_AXES[len(IMAGEJ_AXES) - len(letters):]


def label_layout(path: Path, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """(axes, shape) of the labels of image file ``path`` (:func:`~.image_files.image_shape`
    ``shape``): ("", (H, W)) for one image, (axes, (*sizes, H, W)) for a stack, where the file's
    planes keep their axes (Z × C of a hyperstack, V × Z of an MRC stack of volumes as T × Z),
    ``axes`` in ImageJ's letters (:func:`imagej_axes`) where it has them (header only)."""
    (n, _), (letters, sizes) = image_layout(shape), plane_axes(path)
    h, w = (shape[1:] if is_stack(shape) else shape)[:2]
    if n == 1:
        return "", (h, w)
    if int(np.prod(sizes)) != n:
        letters, sizes = "I", (n,)
    return imagej_axes(letters) or letters, (*sizes, h, w)


def _imagej_size(calibration: dict | None, metadata: dict) -> dict:
    """``tifffile.imwrite`` keywords for the pixel size ``calibration``
    (:func:`~.image_files.pixel_calibration`'s) in an ImageJ file, with its unit and plane spacing
    put in ``metadata`` as Fiji writes them: a length in µm (pixels per µm, ResolutionUnit
    none, ``unit=micron``, ``spacing`` in µm), inches or no unit as given."""
    if not calibration:
        return {}
    (x, y), unit = calibration["resolution"], calibration["resolutionunit"]
    if unit != 3:
        return {"resolution": (x, y), "resolutionunit": unit}
    metadata["unit"] = "micron"
    if calibration.get("spacing"):
        metadata["spacing"] = float(f"{calibration['spacing'] * 1e4:.12g}")  # 0.05, not 0.0499…
    return {"resolution": (x * 1e-4, y * 1e-4), "resolutionunit": 1}


def _properties(meta: dict | None) -> dict | None:
    """What a label file records of the model that made it: {class_names, spec[, made_by]}."""
    return meta and {"class_names": list(meta["class_names"]), "spec": meta["spec"],
                     **({"made_by": meta["made_by"]} if meta.get("made_by") else {})}


def write_labels(path: Path, pages: Iterable[np.ndarray], shape: tuple[int, ...],
                 meta: dict | None = None, calibration: dict | None = None,
                 axes: str | None = None) -> None:
    """Label TIFF of ``shape`` (:func:`label_layout`'s) written as ``pages`` yields its (H, W)
    uint8 planes, one page at a time, as an ImageJ hyperstack: Fiji opens it with its axes
    (``axes``: ImageJ letters of the axes in front of the planes, by default by their number,
    :func:`imagej_axes`; axes of size 1 dropped, as ImageJ does), its classes in view (display
    range 0 to the last class) and the input's pixel size (``calibration``:
    :func:`~.image_files.pixel_calibration`'s, in µm; a stack's Z spacing too), so lengths,
    areas and volumes measured on the labels in Fiji are in the image's units. The model's class
    names and spec, and ``meta["made_by"]`` (:func:`~.predict.model_identity`) where given, are
    the ImageJ property "cellseg" (JSON; Fiji's *Image › Show Info* lists it), which
    :func:`labels_info` and the napari reader read. Labels with more than three axes in front
    of their planes, which ImageJ cannot hold, are written in tifffile's shaped format
    (the same properties in its JSON description). Labels over 4 GB are one ImageJ file as
    Fiji writes them (contiguous pixels after one IFD). Nothing is left at ``path`` if
    ``pages`` fails."""
    info = _properties(meta)
    front = shape[:-2]
    letters = imagej_axes(axes if axes is not None and len(axes) == len(front)
                          else "I" * len(front))
    keywords = {"dtype": np.uint8, "photometric": "minisblack"}  # 3 or 4 pages are not RGB
    if letters is None:
        size = {key: calibration[key] for key in ("resolution", "resolutionunit")} \
            if calibration else {}
        keywords.update(shape=shape, metadata=info and {"cellseg": info}, **size)
    else:
        kept = [(axis, n) for axis, n in zip(letters, front) if n > 1]
        metadata = {"axes": "".join(axis for axis, _ in kept) + "YX"}
        if info:
            metadata.update(min=0, max=max(len(info["class_names"]) - 1, 1),
                            Properties={"cellseg": json.dumps(info)})
        keywords.update(imagej=True, shape=(*(n for _, n in kept), *shape[-2:]),
                        metadata=metadata, **_imagej_size(calibration, metadata))
    with warnings.catch_warnings():  # over 4 GB, ImageJ's format keeps one IFD: as it should
        warnings.filterwarnings("ignore", "truncating ImageJ file", UserWarning)
        write_atomic(path, lambda tmp: tifffile.imwrite(tmp, iter(pages), **keywords))


def labels_info(path: str | Path) -> dict | None:
    """{class_names, spec[, made_by]} of a label file written by ``cellseg predict``: a TIFF's
    ImageJ property "cellseg" (in files of earlier versions, its shaped description's), an MRC
    file's text labels; None for any other file (only the header is read)."""
    path = Path(path)
    try:
        info = _mrc_info(path) if is_mrc(path) else _tiff_info(path)
    except (OSError, ValueError, tifffile.TiffFileError):  # JSONDecodeError is a ValueError,
        return None  # as mrcfile's error on a file that is not MRC
    return info if isinstance(info, dict) and "class_names" in info else None


def _tiff_info(path: Path):
    """The "cellseg" ImageJ property of a label TIFF (JSON), or its shaped description's."""
    with tifffile.TiffFile(path) as f:
        properties = (f.imagej_metadata or {}).get("Properties")
        text = properties.get("cellseg") if isinstance(properties, dict) else None
        return json.loads(text) if isinstance(text, str) else \
            (f.shaped_metadata or ({},))[0].get("cellseg")


def _chunks(text: str, size: int = 80) -> list[str]:
    """``text`` in pieces of at most ``size`` characters, none ending in a space (an MRC text
    label is padded with spaces, which its reader strips)."""
    pieces = []
    while text:
        n = min(size, len(text))
        while n > 1 and text[n - 1] == " ":
            n -= 1
        pieces.append(text[:n])
        text = text[n:]
    return pieces


def _mrc_labels(info: dict | None) -> list[str]:
    """An MRC label file's text labels (ASCII, 80 characters each, 10 at most): the first says
    what it holds, for people (IMOD's ``header`` prints it: "cellseg labels: 0 membrane, 1
    mitochondria, ..."), the others hold ``info`` (:func:`_properties`) as JSON, without its
    spec where the whole does not fit, without any where the class names alone do not."""
    if not info:
        return [MRC_TITLE + " class indices"]
    names = ", ".join(f"{k} {name}" for k, name in enumerate(info["class_names"]))
    title = f"{MRC_TITLE} {names}".encode("ascii", "replace").decode()
    title = title if len(title) <= 80 else title[:77] + "..."
    for kept in (info, {key: value for key, value in info.items() if key != "spec"}):
        pieces = _chunks(json.dumps(kept, ensure_ascii=True, separators=(",", ":")))
        if len(pieces) <= 9:
            return [title, *pieces]
    return [title]


def mrc_label_geometry(source: Path | None, calibration: dict | None) -> dict:
    """The MRC header geometry of labels for image ``source``: an MRC image's own
    (:func:`~.mrc.mrc_geometry`), else the voxel size of ``calibration``
    (:func:`~.image_files.pixel_calibration`'s, where a length: Å; Z the planes' spacing
    where known, else the pixel width)."""
    if source is not None and is_mrc(source):
        return mrc_geometry(source)
    if not calibration or calibration["resolutionunit"] != 3:
        return {}
    x, y = (ANGSTROMS_PER_CM / v for v in calibration["resolution"])
    z = calibration.get("spacing", 0) * ANGSTROMS_PER_CM or x
    return {"voxel_size": (x, y, z)}


def write_mrc_labels(path: Path, pages: Iterable[np.ndarray], shape: tuple[int, ...],
                     meta: dict | None = None, geometry: dict | None = None) -> None:
    """Label MRC file of ``shape`` (:func:`label_layout`'s) written as ``pages`` yields its
    (H, W) planes, in the stored order of its image's sections, with ``geometry``
    (:func:`mrc_label_geometry`): an MRC image's voxel size, origin, start and space group,
    so IMOD's 3dmod, ChimeraX or Amira lay the labels on it (whichever way up they draw MRC
    files, both alike); other images' pixel size. One image is one section, a stack of
    volumes (of an MRC one: space group 401 or more) stays V × Z, other axes in front of the
    planes are one axis of sections. Class indices are mode 0 (bytes, which IMOD reads unsigned and MRC2014 signed:
    the same for up to 128 classes), mode 6 (unsigned 16 bits) for more. The class names
    and spec, and ``meta["made_by"]``, are its text labels (:func:`_mrc_labels`), which
    :func:`labels_info` and the napari reader read. Nothing is left at ``path`` if ``pages``
    fails."""
    info, geometry = _properties(meta), geometry or {}
    if len(shape) > 3 and not (len(shape) == 4 and geometry.get("ispg", 0) >= 401):
        shape = (int(np.prod(shape[:-2])), *shape[-2:])
    dtype = np.int8 if info and len(info["class_names"]) <= 128 else np.uint16
    write_atomic(path, lambda tmp: write_mrc(tmp, (np.asarray(p, dtype) for p in pages), shape,
                                             dtype, geometry, _mrc_labels(info)))


def _mrc_info(path: Path):
    """:func:`_mrc_labels`' JSON of an MRC label file; None for other MRC files."""
    with open_mrc(path) as mrc:
        texts = [bytes(label).decode("ascii", "replace").rstrip(" \0")
                 for label in mrc.header.label[:int(mrc.header.nlabl)]]
    if not texts or not texts[0].startswith(MRC_TITLE) or len(texts) < 2:
        return None
    return json.loads("".join(texts[1:]))
