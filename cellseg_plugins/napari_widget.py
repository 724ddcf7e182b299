"""napari plugin (manifest ``napari.yaml``, entry point ``napari.manifest``): a dock widget
that segments an image layer with a cellseg checkpoint (.pt), an exported model (.onnx) or an
exported BioImage Model Zoo package (.zip) and adds the classes as a labels layer; a
reader that opens ``cellseg predict``'s label TIFFs as labels layers with their class names;
and a writer that saves such a layer, proofread or not, as a label TIFF that keeps them.

napari builds the widget from :func:`segment`'s signature (magicgui resolves the annotations
at run time: no ``from __future__ import annotations`` here) and runs it in a thread worker
(:func:`segment_in_background`); nothing here imports napari at import time, so
:func:`segment` is also plain Python: pass any object with the image layer's ``data``,
``name``, ``rgb``, ``scale`` and ``translate``.
"""

import inspect
import sys
import warnings
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from .errors import DataError

# Loading Triton's LLVM after napari has drawn with Mesa's software OpenGL (llvmpipe: VMs,
# remote desktops) crashes the process. Tiled inference never uses Triton, so in a process
# where torch is not loaded yet (napari opening this plugin), torch is told it is absent.
if "torch" not in sys.modules:
    sys.modules.setdefault("triton", None)

if TYPE_CHECKING:  # napari is optional: pip install "cellseg[napari]"
    import napari


@lru_cache(maxsize=2)
def _predictor(path: str, mtime: tuple[float, ...], runtime: str, device: str):
    from .engine.predict import load_predictor

    return load_predictor(path, runtime, device)


def _progress_bar():
    """napari's progress bar (shown in the viewer's activity dock), or nothing without napari."""
    try:
        from napari.utils import progress
    except ImportError:
        return nullcontext()
    return progress(desc="cellseg: segmenting tiles")


def _counter(bar):
    """A ``progress(done, total)`` callback that moves ``bar`` (None: no bar) one tile on."""
    def advance(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(1)

    return advance


def _labels_kwargs(name: str, info: dict) -> dict:
    """Labels layer arguments: one feature row per label value (row k = class k), so napari
    shows the class name of the label under the cursor; the spec in the metadata."""
    made_by = {"made_by": info["made_by"]} if info.get("made_by") else {}  # predict --resume
    return {"name": name, "features": {"class": list(info["class_names"])},
            "metadata": {"class_names": list(info["class_names"]), "spec": info["spec"],
                         **made_by}}


def segment(
    image: "napari.layers.Image",
    model: Annotated[Path, {"label": "model (.pt, .onnx or .zip)",
                            "filter": "*.pt *.onnx *.zip"}] = Path(),
    tile: Annotated[int, {"min": 32, "max": 4096, "step": 32}] = 256,
    overlap: Annotated[int, {"min": 0, "max": 512}] = 32,
    runtime: Annotated[str, {"choices": ["torch", "onnx"]}] = "torch",
    device: Annotated[str, {"choices": ["cpu", "cuda", "auto"]}] = "cpu",
    rescale: Annotated[bool, {"label": "rescale to the model's pixel size"}] = False,
    tta: Annotated[str, {"label": "test-time augmentation",
                         "choices": ["none", "flips", "d4"]}] = "none",
    cv_runs: Annotated[bool, {"label": "with the other runs of its cv folder"}] = False,
) -> "napari.types.LayerDataTuple":
    """Segment the image layer (every plane of a stack; the full-resolution level of a
    multiscale image) with a cellseg model, tile by tile.

    Returns a labels layer tuple ``(labels (..., H, W) uint8, kwargs, "labels")`` named after
    the image, on the image's scale, units and translation, with the class names as features. The
    model is loaded once and kept while its file is unchanged. ONNX Runtime (.onnx and .zip
    models, or ``runtime="onnx"``) runs on the CPU whatever ``device`` says. A layer whose
    pixel size (its scale in its units) is not the training images' gets a warning, or with
    ``rescale`` is predicted rescaled to theirs, its labels back at its size. ``tta`` averages
    each tile's probabilities over flips (4 passes) or flips and 90° rotations (d4: 8), as
    ``cellseg predict --tta``. ``cv_runs``: the model is a best.pt of a ``cellseg cv`` run, and
    every run of that cv predicts together (``cellseg predict CV_FOLDER``). The dock widget
    runs it in a thread: :func:`segment_in_background`.
    """
    with _progress_bar() as bar:
        return _segment(image, model, tile, overlap, runtime, device, rescale, tta, cv_runs,
                        _counter(bar))


def _segment(image, model, tile, overlap, runtime, device, rescale, tta, cv_runs,
             advance) -> tuple:
    """:func:`segment`, calling ``advance(done, total)`` after each tile."""
    from .engine.ensemble import ensemble_members
    from .engine.image_files import calibration_nm
    from .engine.predict import predict_array, scale_mismatch
    from .engine.train import resolve_device

    if image is None:
        raise DataError("no image layer selected")
    path = Path(model)
    if not path.is_file() or path.suffix not in (".pt", ".onnx", ".zip"):
        raise DataError(f"model {str(path)!r}: choose a cellseg checkpoint (.pt), an exported "
                        ".onnx file or an exported BioImage Model Zoo package (.zip)")
    if path.suffix in (".onnx", ".zip"):
        runtime = "onnx"
    device = "cpu" if runtime == "onnx" else str(resolve_device(device))
    files = [path]
    if cv_runs:  # fold<f>_seed<s>/best.pt: the cv folder above it
        path = path.resolve().parent.parent
        files = ensemble_members(path)
        if len(files) < 2:
            raise DataError(f"model {str(model)!r}: with the other runs of its cv folder, "
                            "choose a run's best.pt in a cellseg cv folder (DIR/fold0_seed0/"
                            "best.pt) beside other runs")
    predictor = _predictor(str(path.resolve()), tuple(f.stat().st_mtime for f in files),
                           runtime, device)
    layer = {"units": getattr(image, "units", None), "scale": tuple(image.scale)}
    size, trained = calibration_nm(_layer_calibration(layer, "")), predictor[1].get("pixel_nm")
    message, factor = scale_mismatch(f"image layer {image.name!r}", size, trained), 1.0
    if message and rescale:
        factor = size / trained
    elif rescale and not (size and trained):
        missing = "the model" if size else f"image layer {image.name!r}"
        message = f"rescale: {missing} has no pixel size; segmented as it is"
    if message and factor == 1.0:  # napari shows it as a notification
        warnings.warn(message, stacklevel=2)
    data = image.data[0] if getattr(image, "multiscale", False) else image.data
    labels = predict_array(predictor, data, rgb=bool(image.rgb), tile=tile, overlap=overlap,
                           device=device, progress=advance, scale=factor, tta=tta)
    kwargs = _labels_kwargs(f"{image.name} cellseg", predictor[1])
    kwargs.update(scale=tuple(image.scale), translate=tuple(image.translate))
    if getattr(image, "units", None) is not None:  # napari >= 0.6: µm, nm, ... or pixel
        kwargs["units"] = tuple(image.units)
    kwargs["metadata"]["model"] = str(path)
    return labels, kwargs, "labels"


class _Stopped(Exception):
    """Raised after a tile once napari has asked the worker to stop."""


_BUSY: set[int] = set()  # ids of the image layers a worker is segmenting


def segment_in_background(*args, **kwargs):
    """The dock widget (same parameters as :func:`segment`): segments in a napari thread
    worker, so the viewer stays responsive and its progress bar counts the tiles as they are
    done; napari adds the labels layer when the worker returns. An error is raised again in
    the main thread, where napari's exception hook shows it as a notification. The worker
    stops after the tile in progress when napari asks it to (``worker.quit()``: its task's
    cancel, closing the viewer), adding nothing. Returns the worker, started once control is
    back in Qt's event loop (after napari has connected its ``returned`` signal: a small
    image could finish first). Run again on a layer that is being segmented is one line
    (two workers would share the CPU or GPU and add the same layer twice)."""
    from napari.qt.threading import create_worker
    from qtpy.QtCore import QTimer
    from superqt.utils import ensure_main_thread

    call = _SIGNATURE.bind(*args, **kwargs)
    call.apply_defaults()
    image = call.arguments["image"]
    if image is not None and id(image) in _BUSY:
        raise DataError(f"image layer {image.name!r} is being segmented already: wait for its "
                        "labels, or cancel it in napari's activity dock")
    bar = _progress_bar()  # its Qt widget is made, and moved, in the main thread
    show, worker = ensure_main_thread(_counter(bar)), []

    def advance(done: int, total: int) -> None:
        if worker[0].abort_requested:
            raise _Stopped
        show(done, total)

    def work():
        try:
            return _segment(*call.args, advance)
        except _Stopped:
            return None  # abort requested: napari adds nothing

    worker.append(create_worker(work))
    worker[0].finished.connect(bar.close)
    if image is not None:
        _BUSY.add(id(image))
        worker[0].finished.connect(lambda: _BUSY.discard(id(image)))
    QTimer.singleShot(0, worker[0].start)
    return worker[0]


_SIGNATURE = inspect.signature(segment)
segment_in_background.__signature__ = _SIGNATURE.replace(
    return_annotation="napari.qt.threading.FunctionWorker[napari.types.LayerDataTuple]")


def get_reader(path):
    """napari reader hook: a reader for label files written by ``cellseg predict`` (TIFF or
    MRC; they carry the class names), None for other files so that napari tries its other
    readers."""
    from .engine.predict import labels_info

    if not isinstance(path, (str, Path)) or \
            not str(path).lower().endswith((".tif", ".tiff", ".mrc")):
        return None
    return read_prediction if labels_info(path) else None


def read_prediction(path) -> list:
    """[(labels, kwargs, "labels")] for a ``cellseg predict`` label file (an MRC one in its
    stored order, as mrcfile reads it); its pixel size, the ImageJ letters of the axes in
    front of its planes and an MRC file's header geometry are kept in the layer's metadata
    (``calibration``, ``axes``, ``mrc_geometry``) for :func:`write_labels_layer`."""
    import numpy as np
    import tifffile

    from .engine.image_files import pixel_calibration, plane_axes
    from .engine.mrc import is_mrc, mrc_geometry, mrc_pixels, open_mrc
    from .engine.predict import labels_info

    path = Path(path)
    kwargs = _labels_kwargs(path.stem, labels_info(path))
    kwargs["metadata"]["axes"] = plane_axes(path)[0]
    calibration = pixel_calibration(path)
    if calibration:
        kwargs["metadata"]["calibration"] = calibration
    if is_mrc(path):
        kwargs["metadata"]["mrc_geometry"] = mrc_geometry(path)
        with open_mrc(path) as mrc:
            return [(np.array(mrc_pixels(mrc)), kwargs, "labels")]
    return [(tifffile.imread(path), kwargs, "labels")]


def _layer_calibration(attributes: dict, axes: str) -> dict | None:
    """A layer's pixel size (its last two axes' ``scale`` in its ``units``, napari >= 0.6) as
    :func:`~cellseg_plugins.engine.image_files.pixel_calibration` gives it, in pixels per cm,
    with the scale of its Z axis as ``spacing`` where ``axes`` (ImageJ's letters of the axes in
    front of its planes) has one; None where the units are not lengths (napari's default:
    pixels)."""
    units, scale = attributes.get("units"), attributes.get("scale")
    if not units or scale is None or len(units) < 2 or len(units) != len(scale):
        return None
    try:
        cm = [float((1 * unit).to("centimeter").magnitude) for unit in units[-2:]]
    except (TypeError, ValueError, AttributeError):  # pint's DimensionalityError: pixels
        return None
    size = [float(s) * c for s, c in zip(scale[-2:], cm)]  # (y, x) in cm
    if not all(v > 0 for v in size):
        return None
    calibration = {"resolution": (1 / size[1], 1 / size[0]), "resolutionunit": 3}
    if "Z" in axes and len(axes) == len(scale) - 2:
        z = axes.index("Z")
        try:
            spacing = float(scale[z]) * float((1 * units[z]).to("centimeter").magnitude)
        except (TypeError, ValueError, AttributeError):
            spacing = 0.0
        if spacing > 0:
            calibration["spacing"] = spacing
    return calibration


def write_labels_layer(path: str, data, attributes: dict) -> list[str]:
    """napari writer hook for a labels layer saved as .tif or .mrc: *File › Save Selected
    Layers* offers it beside napari's own ("cellseg labels with class names"; in
    code, ``layer.save(path, plugin="cellseg")``), and napari may pick either for a plain
    save. A layer of cellseg's (the widget's, or a label file opened by the reader),
    (..., H, W), proofread or not, is saved as ``cellseg predict`` writes labels: with its
    class names, spec, what made it (``predict --resume`` keeps a proofread file), its axes
    (the label file's it came from, else by their number) and pixel size and Z spacing (its
    scale where its units are lengths, else the reader's ``calibration``), so it opens again
    as labels with them: a .tif in Fiji as a calibrated hyperstack (napari's own writer keeps
    the pixels only), a .mrc (:func:`~.engine.label_files.write_mrc_labels`) with the header
    geometry of the MRC label file it came from (its voxel size, origin), else that pixel
    size. Any other labels layer goes to napari's own writer, as without cellseg. Checked
    before anything is written (DataError): a multiscale layer, a label value that names no
    class. A path without an extension gets ``.tif``. The file is replaced whole: saving
    over the file the layer came from is safe."""
    import numpy as np

    from .engine.label_files import (imagej_axes, mrc_label_geometry, write_labels,
                                     write_mrc_labels)

    name, info = attributes.get("name"), attributes.get("metadata") or {}
    names = info.get("class_names")
    if not names:
        from napari_builtins.io import napari_write_labels

        written = napari_write_labels(path, data, attributes)
        return [written] if written else []
    if attributes.get("multiscale"):
        raise DataError(f"labels layer {name!r} is multiscale: cellseg writes one resolution")
    array = np.asarray(data)
    if array.ndim < 2 or 0 in array.shape:
        raise DataError(f"labels layer {name!r} of shape {array.shape}: expected (..., H, W)")
    low, high = array.min(), array.max()
    if low < 0 or high >= len(names):
        raise DataError(f"labels layer {name!r} holds label {low if low < 0 else high}: its "
                        f"classes are 0–{len(names) - 1} ({', '.join(names)}); paint over it "
                        "with one of them, or save the pixels only with napari's own writer "
                        "(napari builtins)")
    path = Path(path) if Path(path).suffix else Path(f"{path}.tif")  # as napari's own writer
    pages = (array[idx].astype(np.uint8) for idx in np.ndindex(*array.shape[:-2]))
    meta = {"class_names": names, "spec": info.get("spec"), "made_by": info.get("made_by")}
    axes = imagej_axes(info.get("axes") if len(info.get("axes") or "") == array.ndim - 2
                       else "I" * (array.ndim - 2))
    calibration = _layer_calibration(attributes, axes or "") or info.get("calibration")
    if path.suffix.lower() == ".mrc":
        write_mrc_labels(path, pages, array.shape, meta,
                         info.get("mrc_geometry") or mrc_label_geometry(None, calibration))
    else:
        write_labels(path, pages, array.shape, meta, calibration, axes)
    return [str(path)]
