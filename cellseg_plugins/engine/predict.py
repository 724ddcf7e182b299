"""Tiled inference on images of any size, with overlap blending and padding; PyTorch or ONNX
Runtime (:class:`OnnxModel`); :func:`predict_paths` is what ``cellseg predict`` runs."""

from __future__ import annotations

import hashlib
import numbers
import re
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..input_rules import InputRules, input_rules
from .checkpoint import write_atomic
from .data import (IMAGE_DIRS, IMAGE_SUFFIXES, DataError, fit_channels, image_files, scale_to_unit,
                   unit_range)
from .image_files import (image_layout, image_shape, is_stack, pixel_calibration, pixel_kind,
                          pixel_nm, read_planes)
from .label_files import (LABEL_FORMATS, label_layout, labels_info, mrc_label_geometry,
                          write_labels, write_mrc_labels)
from .ensemble import Ensemble, combined_rules, ensemble_members, ensemble_meta
from .tta import check_tta, with_tta

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
                    [250, 190, 212]], dtype=np.uint8)


def _ramp(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) blending weights: 1 inside, linear ramp over ``overlap`` pixels at edges."""
    w = torch.ones(tile)
    if overlap > 0:
        edge = torch.linspace(1.0 / (overlap + 1), 1.0, overlap + 1)[:-1]
        w[:overlap], w[tile - overlap:] = edge, edge.flip(0)
    return w[:, None] * w[None, :]


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


def tile_grid(h: int, w: int, tile: int, overlap: int, rules: InputRules | None = None):
    """(tile side, padded H, padded W, tile rows, tile columns) for an H×W image: the tile is
    grown to a side the model takes (``rules``, default multiples of 32)."""
    tile = (rules or InputRules(32, 32)).fit(min(tile, max(h, w)))
    ph, pw = max(tile, h), max(tile, w)
    step = max(1, tile - overlap)
    return tile, ph, pw, _starts(ph, tile, step), _starts(pw, tile, step)


def _as_is(a: np.ndarray) -> np.ndarray:
    return a


@torch.no_grad()
def predict_image(model, image: np.ndarray, mean, std, tile: int = 256, overlap: int = 32,
                  rules: InputRules | None = None, device="cpu", on_tile=None,
                  to_unit=None) -> np.ndarray:
    """Label map (H, W) uint8 for one image (H, W[, C]).

    ``to_unit`` maps a tile of ``image`` to float32 in [0, 1] with the model's channels
    (:func:`unit_tiles`); without it ``image`` is that already. Tiles of ``tile`` px overlap
    by ``overlap`` px (:func:`tile_grid`); softmax probabilities are blended with linear edge
    ramps. An image smaller than the tile is padded to it (reflected, or replicated where it
    is small). ``on_tile()`` is called after each tile. Each tile is scaled and normalised as
    it is cut, and the blended probabilities are held for one row of tiles (classes × tile ×
    W): the rows above the next row of tiles are final, and labelled. Beside the image as
    given (uint8: 1 byte a pixel) and its labels, memory grows with its width only.
    """
    model.eval()
    to_unit = to_unit or _as_is
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    h, w = image.shape[:2]
    tile, ph, pw, rows, cols = tile_grid(h, w, tile, overlap, rules)
    if (ph, pw) != (h, w):  # only an image smaller than the tile: no copy of a large one
        x = torch.from_numpy(np.ascontiguousarray(to_unit(image)))
        x = (x[None] if x.ndim == 2 else x.permute(2, 0, 1))[None]
        mode = "reflect" if ph - h < h and pw - w < w else "replicate"  # reflect: pad < size
        image = F.pad(x, (0, pw - w, 0, ph - h), mode=mode)[0].permute(1, 2, 0).numpy()
        to_unit = _as_is  # scaled above
    weight = _ramp(tile, min(overlap, tile // 2))
    labels = np.empty((ph, pw), np.uint8)
    probs, norm = None, torch.zeros(tile, pw)  # rows y0 … y0 + tile of the image
    for i, y0 in enumerate(rows):
        for x0 in cols:
            patch = torch.from_numpy(np.ascontiguousarray(
                to_unit(image[y0:y0 + tile, x0:x0 + tile])))
            patch = (patch[None] if patch.ndim == 2 else patch.permute(2, 0, 1))[None]
            p = model(((patch - mean) / std).to(device)).softmax(1)[0].cpu()
            if probs is None:
                probs = torch.zeros(p.shape[0], tile, pw)
            probs[:, :, x0:x0 + tile] += p * weight
            norm[:, x0:x0 + tile] += weight
            if on_tile:
                on_tile()
        final = (rows[i + 1] if i + 1 < len(rows) else ph) - y0
        labels[y0:y0 + final] = (probs[:, :final] / norm[:final]).argmax(0).numpy()
        probs = torch.cat([probs[:, final:], probs.new_zeros(len(probs), final, pw)], 1)
        norm = torch.cat([norm[final:], norm.new_zeros(final, pw)])
    return np.ascontiguousarray(labels[:h, :w])


def _tiles(shape: tuple[int, ...], tile: int, overlap: int, rules) -> int:
    """How many tiles :func:`predict_image` cuts from an image of this (H, W, ...) shape."""
    _, _, _, rows, cols = tile_grid(shape[0], shape[1], tile, overlap, rules)
    return len(rows) * len(cols)


def _tile_counter(progress, total: int):
    """predict_image's ``on_tile()`` that calls ``progress(done, total)``; None without one."""
    if progress is None:
        return None
    done = [0]

    def on_tile() -> None:
        done[0] += 1
        progress(done[0], total)

    return on_tile


def unit_tiles(image: np.ndarray, channels: int, name):
    """The ``to_unit`` of :func:`predict_image` for a raw image (H, W[, C]) of any pixel type:
    its tiles scaled as the whole image (:func:`unit_range`: min/max over the whole image for
    floats) and fitted to the model's ``channels`` (:func:`fit_channels`)."""
    offset, span = unit_range(image, name)
    return lambda a: fit_channels(scale_to_unit(a, offset, span), channels, name)


def input_paths(inputs: list[str]) -> list[Path]:
    """The image files of ``inputs`` (files, and the PNG / TIFF files of folders)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += image_files(p)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"input {item!r} does not exist")
    if not paths:
        subfolders = [d for item in inputs if Path(item).is_dir()
                      for d in sorted(Path(item).iterdir())
                      if d.is_dir() and d.name.lower() in {n.lower() for n in IMAGE_DIRS}]
        hint = f" (its images are in {str(subfolders[0])!r})" if subfolders else ""
        raise DataError(f"no PNG, TIFF, MRC, JPEG or BMP images in {', '.join(inputs)}{hint}")
    return paths


def check_channels(channels: int, expected: int, name, pixels) -> None:
    """Raise DataError unless images of ``channels`` channels can feed a model that expects
    ``expected``: grey feeds a colour model (repeated into RGB); colour feeds a grey model
    only if every array of ``pixels()`` is grey saved as RGB (:func:`fit_channels`)."""
    if (channels, expected) == (3, 1):
        for page in pixels():
            fit_channels(page, 1, name)
    elif channels not in (1, expected):
        raise DataError(f"{name}: {channels} channel(s), the model expects {expected}")


def check_tiling(tile: int, overlap: int) -> None:
    """Raise ConfigError unless tile >= 32 and 0 <= overlap <= tile / 2: the blending ramps
    span at most half a tile, and a larger overlap only multiplies the tiles (``--tile 33``
    with the default overlap 32 stepped by one pixel: 45 000 tiles for a 300×200 image)."""
    for name, value in (("tile", tile), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(name, value, "must be an integer (pixels)")
    if tile < 32:
        raise ConfigError("tile", tile, "must be at least 32")
    if not 0 <= overlap <= tile // 2:
        raise ConfigError("overlap", overlap, f"must be in [0, {tile // 2}] (at most half of "
                          f"the tile, {tile})")


def predict_array(predictor, data, rgb: bool = False, tile: int = 256, overlap: int = 32,
                  device=None, progress=None, scale: float = 1.0, tta: str = "none"
                  ) -> np.ndarray:
    """Label array for an image array of any rank: (..., H, W), or (..., H, W, C) when ``rgb``.

    ``predictor`` is :func:`load_predictor`'s (model, metadata, input rules). Leading axes
    (stack, time, z) are planes segmented one by one; each plane is scaled to [0, 1] as
    ``cellseg predict`` scales a file (uint8/uint16 by their range, floats by min/max).
    ``data`` may be a lazy array (dask, zarr: anything with ``shape``, ``dtype`` and
    indexing), read one plane at a time. ``progress(done, total)`` is called after each tile.
    The tiles go to the model's device (``load_predictor``'s; ONNX Runtime: the CPU);
    ``device``, when given, must be that one. ``scale`` != 1 predicts each plane rescaled by
    it (to the training images' pixel size, :func:`predict_plane`), its labels back at its
    size. ``tta`` (flips, d4) averages each tile's probabilities over flips and rotations
    (:mod:`.tta`). Returns uint8 labels (..., H, W); this is what the napari widget runs.
    """
    check_tiling(tile, overlap)
    model, meta, rules = predictor
    device = _model_device(model, device)
    model = with_tta(model, tta)
    if not all(hasattr(data, a) for a in ("shape", "dtype", "__getitem__")):
        data = np.asarray(data)  # lists; arrays, lazy or not, are read a plane at a time
    shape, plane_ndim = tuple(int(n) for n in data.shape), 3 if rgb else 2
    if len(shape) < plane_ndim or 0 in shape:
        raise DataError(f"image of shape {shape}: expected (..., H, W){', C' if rgb else ''}")
    name = f"image of shape {shape}"
    lead, (h, w) = shape[:-plane_ndim], shape[-plane_ndim:][:2]

    def planes():
        return ((idx, np.asarray(data[idx])) for idx in np.ndindex(*lead))

    channels = min(shape[-1], 3) if rgb else 1  # RGBA loses alpha, as in files
    check_channels(channels, meta["in_channels"], name,
                   lambda: (plane[..., :3] for _, plane in planes()))
    if not (isinstance(scale, numbers.Real) and scale > 0):
        raise ConfigError("scale", scale, "a factor > 0")
    on_tile = _tile_counter(progress, int(np.prod(lead)) * _scaled_tiles(h, w, scale, tile,
                                                                         overlap, rules))
    labels = np.empty((*lead, h, w), np.uint8)
    for idx, plane in planes():
        labels[idx] = predict_plane(model, plane, meta, tile, overlap, rules, device, on_tile,
                                    name, scale)
    return labels


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    grey = image if image.ndim == 2 else image.mean(-1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1).astype(np.float32)
    colours = PALETTE[labels % len(PALETTE)].astype(np.float32)
    return ((1 - alpha) * rgb + alpha * colours).astype(np.uint8)


class OnnxModel:
    """An ONNX model exported by cellseg, run by ONNX Runtime on the CPU; called like the
    PyTorch model (N, C, H, W) tensor → logits tensor. ``probabilities``: the model returns
    class probabilities (a BioImage Model Zoo package's weights); their logarithm is returned,
    whose softmax gives them back."""

    def __init__(self, path: str | Path, threads: int | None = None, probabilities=False,
                 name: str | Path | None = None):
        import onnxruntime

        self.probabilities = probabilities
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 — its Fail, InvalidGraph, NotImplemented, ...
            reason = re.sub(r"^.*? failed:(\S+:\d+ .*?\) )?", "", " ".join(str(e).split()))
            if len(reason) > 200:  # its first sentences
                reason = reason[:200].rsplit(". ", 1)[0] + "."
            raise DataError(f"{name or path}: ONNX Runtime {onnxruntime.__version__} cannot "
                            f"run it: {reason}") from None
        self.input = self.session.get_inputs()[0].name

    def eval(self) -> "OnnxModel":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(self.session.run(None, {self.input: x.cpu().numpy()})[0])
        return out.clamp_min(1e-30).log() if self.probabilities else out


@contextmanager
def _onnx_file(source: Path):
    """The ONNX file of an exported .onnx model, or of a cellseg BioImage Model Zoo package
    (its weights.onnx, extracted to a temporary folder for as long as the context lasts)."""
    if source.suffix == ".onnx":
        yield source
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with zipfile.ZipFile(source) as package:
                package.extract("weights.onnx", tmp)
        except (zipfile.BadZipFile, KeyError, OSError):
            raise DataError(f"{source}: not a BioImage Model Zoo package exported by cellseg "
                            "(no weights.onnx in it)") from None
        yield Path(tmp) / "weights.onnx"


def _model_device(model, device=None) -> torch.device:
    """The device ``model`` runs on (its parameters'; the CPU for ONNX Runtime), checked
    against ``device`` when given (ConfigError naming both)."""
    from .train import resolve_device

    own = next(iter(getattr(model, "parameters", list)()), torch.empty(0)).device
    if device is not None and resolve_device(device) != torch.device(own.type):
        where = "ONNX Runtime runs on the CPU" if isinstance(model, OnnxModel) else \
            f"the model is on {own.type}: load it with load_predictor(..., device={device!r})"
        raise ConfigError("device", device, where)
    return own


def load_predictor(source: str | Path, runtime: str = "torch", device="cpu"):
    """(model, metadata, input rules) for a checkpoint (PyTorch, or ONNX Runtime after an
    export to a temporary file), an exported .onnx file or a BioImage Model Zoo package
    (.zip) exported by cellseg (its ONNX weights), or a ``cellseg cv`` folder, whose runs'
    best.pt predict together (:class:`~.ensemble.Ensemble`); metadata holds class names, norm,
    in_channels and the spec."""
    from ..registry import create_model
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .export import export_checkpoint, read_metadata
    from .train import resolve_device

    if runtime not in ("torch", "onnx"):
        raise DataError(f"--runtime {runtime!r}: expected torch or onnx")
    device = torch.device("cpu") if runtime == "onnx" and device == "auto" else \
        resolve_device(device)
    if runtime == "onnx" and device.type != "cpu":
        raise ConfigError("device", str(device), "ONNX Runtime runs on the CPU; use cpu, or "
                          "the torch runtime")
    source = Path(source)
    if source.is_dir() and not (source / "best.pt").is_file():  # (a run folder: a hint below)
        members = ensemble_members(source)
        if not members:
            raise DataError(f"checkpoint {str(source)!r} is a folder without checkpoints: give "
                            "a best.pt, or a cellseg cv folder (its runs' models predict "
                            "together)")
        models, metas, rules = zip(*(load_predictor(m, runtime, device) for m in members))
        return (Ensemble(list(models), [m["norm"] for m in metas]),
                ensemble_meta(source, members, list(metas)), combined_rules(source, list(rules)))
    if source.suffix in (".onnx", ".zip"):
        if runtime != "onnx":
            kind = "an ONNX model" if source.suffix == ".onnx" else "a BioImage Model Zoo package"
            raise DataError(f"{source} is {kind}: use --runtime onnx")
        with _onnx_file(source) as path:
            meta = read_metadata(path, "onnx")
            model = OnnxModel(path, probabilities=source.suffix == ".zip", name=source)
        rules = input_rules(create_model(meta["spec"], in_channels=meta["in_channels"],
                                         classes=len(meta["class_names"])))
        return model, meta, rules
    ckpt = load_checkpoint(source)
    meta = {**{k: ckpt[k] for k in ("spec", "class_names", "in_channels", "norm")},
            "pixel_nm": ckpt.get("pixel_nm")}
    model = model_from_checkpoint(ckpt).to(device)
    if runtime == "torch":  # channels-last weights: the convolutions take that path (faster)
        return model.to(memory_format=torch.channels_last), meta, input_rules(model)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_checkpoint(source, "onnx", Path(tmp) / "model.onnx")
        return OnnxModel(onnx_path), meta, input_rules(model)


def model_identity(source: Path, runtime: str, tile: int, overlap: int,
                   tta: str = "none") -> dict:
    """What makes a label file's pixels besides its image: the model file's SHA-256 (an
    ensemble's: its members', one after another), the runtime, tile, overlap and test-time
    augmentation (where there is one). ``predict --resume`` keeps a label file whose
    ``made_by`` is this."""
    digest = hashlib.sha256()
    for path in ensemble_members(source) or [source]:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"sha256": digest.hexdigest(), "runtime": runtime, "tile": tile, "overlap": overlap,
            **({"tta": tta} if tta != "none" else {})}


def _written_by(target: Path, overlays: list[Path], identity: dict,
                shape: tuple[int, ...]) -> bool:
    """Whether ``target`` is a whole label file of ``shape`` made by ``identity`` (beside its
    overlay PNGs, where asked): what ``--resume`` keeps."""
    if not target.is_file() or not all(png.is_file() for png in overlays):
        return False
    info = labels_info(target)
    if not info or info.get("made_by") != identity:
        return False
    try:  # the header's shape, and a file that ends before its pixels do refused
        return image_shape(target) == (shape if len(shape) == 2
                                       else (int(np.prod(shape[:-2])), *shape[-2:]))
    except DataError:
        return False


def output_paths(inputs: list[tuple[Path, int]], out: Path, with_overlay: bool = False,
                 suffix: str = ".tif") -> list[tuple[Path, list[Path]]]:
    """(label file, overlay PNGs) in ``out`` for each (input path, page count): OUT/STEM.tif
    (or ``suffix``), OUT/STEM[_k]_overlay.png. Refuses (DataError) an ``out`` named like an
    image, two inputs that would write one file, and a file that would overwrite an input."""
    if out.suffix.lower() in IMAGE_SUFFIXES and not out.is_dir():
        raise ConfigError("out", str(out), "must be a folder (each label TIFF is named "
                          "after its input image), e.g. --out predictions")
    sources = {path.resolve(): path for path, _ in inputs}
    taken: dict[Path, Path] = {}
    result = []
    for path, n in inputs:
        target = out / f"{path.stem}{suffix}"
        pngs = [out / f"{path.stem}{f'_{k}' if n > 1 else ''}_overlay.png"
                for k in range(n)] if with_overlay else []
        for file in (target, *pngs):
            key = file.resolve()
            if key in sources:
                raise DataError(f"--out {str(out)!r}: {file} would overwrite the input "
                                f"{sources[key]}; choose another --out")
            if key in taken:
                raise DataError(f"{taken[key]} and {path} would both be written to {file}; "
                                "predict them into separate --out folders")
            taken[key] = path
        result.append((target, pngs))
    return result


def scale_mismatch(name, image_nm: float | None, model_nm: float | None,
                   tolerance: float = 1.25) -> str | None:
    """A warning where an image's pixel size (nm) is more than ``tolerance`` times larger or
    smaller than the training images' (a model recognises structures at the size in pixels it
    learnt them); None where they agree or either is unknown."""
    if not image_nm or not model_nm or 1 / tolerance <= image_nm / model_nm <= tolerance:
        return None
    ratio = image_nm / model_nm
    return (f"{name}: {image_nm:.3g} nm pixels, where the model was trained on {model_nm:.3g} "
            f"nm ones ({ratio:.2g}× {'larger' if ratio > 1 else 'smaller'}): its labels may be "
            f"poor; rescale it by {ratio:.3g} (predict --rescale, or the napari widget's "
            "rescale, do so and bring the labels back) or train on images of its pixel size")


def rescale_plane(plane: np.ndarray, factor: float) -> np.ndarray:
    """``plane`` (H, W[, C]) resized by ``factor`` with PIL's bilinear filter (which, shrinking,
    averages over what an output pixel covers: no aliasing; no overshoot either), in its own
    pixel type."""
    from PIL import Image

    h, w = plane.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    out = []
    for channel in ([plane] if plane.ndim == 2 else np.moveaxis(plane, -1, 0)):
        if channel.dtype == np.uint8:
            out.append(np.asarray(Image.fromarray(channel).resize(size, Image.BILINEAR)))
            continue
        resized = np.asarray(Image.fromarray(channel.astype(np.float32)).resize(
            size, Image.BILINEAR))
        out.append((np.round(resized) if channel.dtype.kind in "biu" else resized
                    ).astype(channel.dtype))
    return out[0] if plane.ndim == 2 else np.stack(out, -1)


def _labels_at(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 labels resized to ``shape`` (nearest: classes are not averaged)."""
    from PIL import Image

    if labels.shape == tuple(shape):
        return labels
    return np.asarray(Image.fromarray(labels).resize(shape[::-1], Image.NEAREST))


def predict_plane(model, plane: np.ndarray, meta: dict, tile: int, overlap: int, rules,
                  device, on_tile, name, factor: float = 1.0) -> np.ndarray:
    """Labels (H, W) uint8 of one raw plane (H, W[, C]) of any pixel type, scaled to [0, 1]
    as a whole (:func:`unit_tiles`) and normalised by the model's statistics; with ``factor``
    != 1 predicted rescaled by it (:func:`rescale_plane`: to the training images' pixel
    size) and its labels resized back."""
    norm = meta["norm"]
    to_unit = unit_tiles(plane, meta["in_channels"], name)  # by the plane as it is
    scaled = plane if factor == 1.0 else rescale_plane(plane, factor)
    return _labels_at(predict_image(model, scaled, norm["mean"], norm["std"], tile, overlap,
                                    rules, device, on_tile, to_unit), plane.shape[:2])


def _scaled_tiles(h: int, w: int, factor: float, tile: int, overlap: int, rules) -> int:
    """The tiles of an (H, W) plane predicted rescaled by ``factor``."""
    return _tiles((max(1, round(h * factor)), max(1, round(w * factor))), tile, overlap, rules)


def predict_paths(source: str | Path, inputs: list[str], out: str | Path, tile: int = 256,
                  overlap: int = 32, with_overlay: bool = False, device="cpu",
                  runtime: str = "torch", on_image=None, progress=None, resume: bool = False,
                  on_kept=None, on_warning=None, rescale: bool = False,
                  on_rescale=None, pixel_size: float | None = None,
                  label_format: str = "tif", tta: str = "none") -> list[Path]:
    """Label files (TIFFs, or MRC files with ``label_format``; one per input, named after it;
    stacks stay stacks; the pixel size of a TIFF or MRC file kept) in ``out``, with colour
    overlay PNGs if asked; returns them.

    Every input's header (size, pages, channels, pixel type; the pixels of RGB files for a
    grey model too, grey saved as RGB being taken as grey, and of float files, whose NaN or
    infinite pixels are refused) and every output name are checked before anything is
    written; then the images are read one plane at a time (:func:`read_planes`: a TIFF stack
    page by page), each plane's labels written as they come. ``on_image(path, target,
    shape)`` is called after each input (``shape``: its labels'), ``progress(done, total)``
    after each tile of all of them (the total from the headers). Each label file records what
    made it (:func:`model_identity`); with ``resume``, an input whose label file (and
    overlays) the same model, runtime, tile and overlap made already is skipped, with
    ``on_kept(path, target)``: an interrupted batch goes on where it stopped. An input whose
    pixel size differs from the training images' (:func:`scale_mismatch`) is reported before
    anything is written, with ``on_warning(message)`` (default: a Python warning); with
    ``rescale`` it is rescaled to theirs instead (:func:`rescale_plane`), predicted, and its
    labels resized back (nearest), with ``on_rescale(path, factor)``. ``rescale`` needs a
    model that knows its pixel size (DataError); an input without one is predicted as it is,
    with a warning. ``pixel_size`` (nm) is every input's, in place of their files'
    calibration. ``label_format`` "mrc" writes MRC label files instead of TIFFs
    (:func:`~.label_files.write_mrc_labels`: on an MRC image, its voxel size and origin).
    ``tta`` (flips, d4) averages each tile's probabilities over flips and rotations
    (:mod:`.tta`)."""
    from PIL import Image

    check_tiling(tile, overlap)
    if label_format not in LABEL_FORMATS:
        raise ConfigError("format", label_format, f"expected {' or '.join(LABEL_FORMATS)}")
    check_tta(tta)
    model, meta, rules = load_predictor(source, runtime, device)
    model = with_tta(model, tta)
    meta = {**meta, "made_by": model_identity(Path(source), runtime, tile, overlap, tta)}
    paths = input_paths(inputs)
    shapes = [image_shape(path) for path in paths]  # headers only
    layouts = [image_layout(shape) for shape in shapes]
    out = Path(out)
    targets = output_paths([(path, n) for path, (n, _) in zip(paths, layouts)], out,
                           with_overlay, LABEL_FORMATS[label_format])
    kept = [resume and _written_by(target, overlays, meta["made_by"],
                                   label_layout(path, shape)[1])
            for path, shape, (target, overlays) in zip(paths, shapes, targets)]
    trained = meta.get("pixel_nm")
    if rescale and not trained:
        raise DataError(f"--rescale: {source} has no pixel size (its training images had no "
                        "calibration, or several); predict without --rescale")
    warn = on_warning or (lambda text: warnings.warn(text, stacklevel=4))
    factors = [1.0] * len(paths)  # each input's rescaling to the training images' pixel size
    for k, (path, done) in enumerate(zip(paths, kept)):
        size = None if done else (pixel_size or pixel_nm(path))
        message = scale_mismatch(path, size, trained)
        if message and rescale:
            factors[k] = size / trained
        elif message:
            warn(message)
        elif rescale and not done and size is None:
            warn(f"{path}: no pixel size (an uncalibrated file): predicted as it is")
    for path, (_, channels), done in zip(paths, layouts, kept):
        if done:
            continue
        check_channels(channels, meta["in_channels"], path,
                       lambda: (plane[..., :3] for plane in read_planes(path)))
        if pixel_kind(path) not in "bui":  # refused before anything is written: pixels that
            for plane in read_planes(path):  # are not numbers, NaN or infinite ones
                unit_range(plane, path)
    on_tile = _tile_counter(progress, sum(
        n * _scaled_tiles(*(shape[1:] if is_stack(shape) else shape)[:2], f, tile, overlap,
                          rules)
        for shape, (n, _), done, f in zip(shapes, layouts, kept, factors) if not done))
    out.mkdir(parents=True, exist_ok=True)
    unit = lambda plane, path: unit_tiles(plane, meta["in_channels"], path)  # noqa: E731
    for path, shape, (target, overlays), done, f in zip(paths, shapes, targets, kept, factors):
        if done:
            if on_kept:
                on_kept(path, target)
            continue
        if f != 1.0 and on_rescale:
            on_rescale(path, f)
        labels = (predict_plane(model, p, meta, tile, overlap, rules, device, on_tile, path, f)
                  for p in read_planes(path))
        axes, out_shape = label_layout(path, shape)
        calibration = pixel_calibration(path)
        if label_format == "mrc":  # plane by plane
            write_mrc_labels(target, labels, out_shape, meta,
                             mrc_label_geometry(path, calibration))
        else:
            write_labels(target, labels, out_shape, meta, calibration, axes)
        if overlays:  # each page again, beside its labels read back from the TIFF
            for png, p, lab in zip(overlays, read_planes(path), read_planes(target)):
                write_atomic(png, lambda tmp: Image.fromarray(overlay(unit(p, path)(p), lab)
                                                              ).save(tmp, format="PNG"))
        if on_image:
            on_image(path, target, out_shape)
    return [target for target, _ in targets]
