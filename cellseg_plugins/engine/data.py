"""Data sets: built-in synthetic data, ssTEM (fetched and verified), users' image/mask folders.

Everything is loaded as *source images* (H, W) or (H, W, C) float32 in [0, 1] with integer masks;
crops, folds and augmentation work on source indices, so splits never share a source image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .image_files import check_pixel_type, is_stack, pixel_nm, read_image
from .label_files import labels_info
from .mrc import MRC_SUFFIXES
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
    give one source per page. Class names: ``class_map``'s, else those of the masks where
    cellseg wrote them all (:func:`label_file_names`), else class0…classK."""
    if not root.is_dir():
        raise DataError(f"--data {str(root)!r}: not 'synthetic', 'sstem' or an existing folder")
    image_dir, mask_dir = _find_dir(root, IMAGE_DIRS, "image"), _find_dir(root, MASK_DIRS, "mask")
    masks_by_stem = {p.stem: p for p in image_files(mask_dir)}
    names, value_map = parse_class_map(class_map) if class_map else ((), None)
    images, masks, stems, sizes, mask_paths = [], [], [], [], []
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
            mask_paths.append(mask_path)
            stems.append(f"{path.stem}[{k}]" if stack else path.stem)
    if not images:
        raise DataError(f"{image_dir}: no PNG, TIFF, MRC, JPEG or BMP images")
    if len({im.ndim for im in images}) > 1:  # grey and colour: all as colour
        images = [fit_channels(im, 3, name) for im, name in zip(images, stems)]
    if not names:
        names = label_file_names(masks, mask_paths) or index_names(masks, mask_dir)
    if len(names) > MAX_CLASSES:
        raise DataError(f"{mask_dir}: {len(names)} classes, more than the {MAX_CLASSES} a label "
                        "image holds; one value per object is an instance mask, and cellseg "
                        "segments classes: map the values to classes with --class-map")
    return SourceSet(images, masks, names, stems, sizes)


def label_file_names(masks: list[np.ndarray], paths: list[Path]) -> tuple[str, ...] | None:
    """The class names of masks (each from the file in ``paths``) that are all label files
    of cellseg's with the same classes (``cellseg predict``'s, proofread ones saved from
    napari: :func:`~.label_files.labels_info`), so a model trained on proofread labels keeps
    their names; None otherwise. A mask value that is no class of its file raises
    DataError."""
    infos = {path: labels_info(path) for path in dict.fromkeys(paths)}
    named = {tuple(info["class_names"]) for info in infos.values() if info}
    if not infos or None in infos.values() or len(named) != 1:
        return None
    (names,) = named
    for mask, path in zip(masks, paths):
        if int(mask.max()) >= len(names):
            raise DataError(f"{path}: mask value {int(mask.max())} is no class of this label "
                            f"file's ({', '.join(names)}: 0–{len(names) - 1})")
    return names


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
