"""Each paper's ssTEM training settings as a named preset (``--preset fa|fu|frem|lfa``).

A preset fills the training options a user did not set; the defaults without a preset stay the
quick ones. Every value is the paper's where the paper states it; ``unstated`` names the values
the paper leaves open and says where they come from instead.

Split: every preset uses METHODS.md's protocol (5 folds by section: 12 train / 4 validation /
4 test sections = 192/64/64 crops), which the LFA paper states. The Feedback U-Net and FA papers
state 192/48/80 crops with 5 folds, which no split by section tiles; the FREM paper gives no
split for ssTEM. One protocol for all keeps every row of a study on the same folds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ..errors import DataError

SPLIT = "5 folds by section: 12/4/4 sections = 192/64/64 crops of 256²"


@dataclass(frozen=True)
class Preset:
    """A paper's training settings (TrainConfig field → value) and where each comes from."""

    name: str
    paper: str
    settings: dict
    stated: str
    unstated: str
    split: str = SPLIT
    extra: dict = field(default_factory=dict)


PRESETS = {
    "fu": Preset(
        "fu", "Feedback U-Net (Shibuya & Hotta, CVPR-W 2020)",
        {"data": "sstem", "classes": "sstem4", "epochs": 1500, "lr": 1e-4, "batch_size": 16,
         "optimizer": "adam", "schedule": "none", "loss": "ce", "class_weights": "auto",
         "crop": 256, "augment": True, "folds": 5},
        stated="4 classes; Adam, lr 0.0001, 1500 epochs, batch 16 (§4.2); softmax cross-"
               "entropy (Eq. 1) with class weights (§4.2); 256² crops; 5-fold CV",
        unstated="the class-weight formula (median frequency here); ssTEM augmentation "
                 "(rot90/flip, the lab's, stated for the mouse data)"),
    "fa": Preset(
        "fa", "Feedback Attention (Tsuda, Shibuya & Hotta, ECCV-W 2020)",
        {"data": "sstem", "classes": "sstem4", "epochs": 1500, "lr": 1e-4, "batch_size": 16,
         "optimizer": "adam", "schedule": "none", "loss": "ce", "class_weights": "none",
         "crop": 256, "augment": True, "folds": 5},
        stated="4 classes; softmax cross-entropy (§3.1); 256² crops; 5 folds × 3 seeds "
               "(§4.1, cellseg cv --seeds 3)",
        unstated="optimizer, lr, epochs, batch: the Feedback U-Net paper's (same lab, same "
                 "split, its Table 1 U-Net and Feedback U-Net rows reappear); augmentation "
                 "(rot90/flip, the lab's)",
        extra={"seeds": 3}),
    "frem": Preset(
        "frem", "FREM (Ando & Hotta, VISAPP 2021)",
        {"data": "sstem", "classes": "sstem4", "epochs": 2000, "lr": 1e-3, "batch_size": 8,
         "optimizer": "adam", "schedule": "none", "loss": "ce", "class_weights": "none",
         "crop": 256, "augment": True, "folds": 5},
        stated="4 classes; 2000 epochs, model chosen at best validation mIoU, softmax cross-"
               "entropy (§4.3); 256² crops",
        unstated="optimizer, lr, batch, folds and augmentation: the lab's PyTorch settings "
                 "of the LFA paper (Adam, lr 0.001, batch 8), 5 folds, rot90/flip"),
    "lfa": Preset(
        "lfa", "LFA (Furukawa & Hotta)",
        {"data": "sstem", "classes": "sstem5", "epochs": 1500, "lr": 1e-3, "batch_size": 8,
         "optimizer": "adam", "schedule": "none", "loss": "focal+iou", "class_weights": "none",
         "crop": 256, "augment": True, "folds": 5},
        stated="5 classes; Adam, lr 0.001, batch 8, 1500 epochs, Focal + IoU loss (§IV-B); "
               "192/64/64 crops of 256², 5-fold CV (§IV-A)",
        unstated="augmentation (rot90/flip, the lab's)"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise DataError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_preset(cfg, name: str | None, explicit: set[str] = frozenset()):
    """``cfg`` with preset ``name``'s settings, except the fields in ``explicit`` (set by the
    user); ``name=None`` returns ``cfg`` unchanged."""
    if name is None:
        return cfg
    known = {f.name for f in fields(cfg)}
    values = {k: v for k, v in get_preset(name).settings.items()
              if k in known and k not in explicit}
    if cfg.data != "sstem" and "data" in explicit and "classes" in values:  # ssTEM's class map
        del values["classes"]
    return replace(cfg, preset=name, **values)


def describe_presets() -> str:
    """One line per preset, for ``--help``."""
    return "; ".join(f"{p.name}: {p.paper}" for p in PRESETS.values())
