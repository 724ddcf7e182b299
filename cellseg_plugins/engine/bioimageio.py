"""A checkpoint as a BioImage Model Zoo package (model format 0.5, built with bioimageio.spec).

The package holds TorchScript and ONNX weights that return class probabilities (softmax of
the logits), the checkpoint's normalisation as preprocessing (8-bit intensities: mean and std
× 255), class names as output channels, test input and output tensors, a cover image made
from a prediction, a README and the papers to cite. It is written only after
``bioimageio.core``'s own model test (the check the Zoo runs) passes on it.
"""

from __future__ import annotations

import getpass
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..hooks import probe_size
from ..registry import parse_spec
from .data import DataError
from .predict import overlay

PAPERS = {  # plugin → (citation, a link to find it)
    "feedback_self": "H. Tsuda, E. Shibuya, K. Hotta, Feedback Attention for Cell Image Segmentation, ECCV Workshops 2020",
    "feedback_st": "H. Tsuda, E. Shibuya, K. Hotta, Feedback Attention for Cell Image Segmentation, ECCV Workshops 2020",
    "feedback_attention": "H. Tsuda, E. Shibuya, K. Hotta, Feedback Attention for Cell Image Segmentation, ECCV Workshops 2020",
    "feedback_convlstm": "E. Shibuya, K. Hotta, Feedback U-Net for Cell Image Segmentation, CVPR Workshops 2020",
    "frem": "T. Ando, K. Hotta, Cell Image Segmentation by Feature Random Enhancement Module, VISAPP 2021",
    "lfa": "R. Furukawa, K. Hotta, Localized Feature Aggregation Module for Semantic Segmentation",
}
SMP = ("P. Iakubovskii, Segmentation Models Pytorch",
       "https://github.com/qubvel-org/segmentation_models.pytorch")
SSTEM_DOI = "10.6084/m9.figshare.856713"


class Probabilities(nn.Module):
    """softmax over classes of the wrapped model's logits; (N, C, H, W) → (N, K, H, W)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


def test_image(in_channels: int, size: int) -> np.ndarray:
    """A synthetic EM-like image (C, size, size) with 8-bit intensities as float32."""
    from .synthetic import synthetic_image

    image = synthetic_image(0, size)[0]
    image = np.repeat(image[None], in_channels, axis=0)
    return (image * 255).astype(np.float32)


def citations(spec: str, data: str | None):
    import bioimageio.spec.model.v0_5 as v

    plugins = [t.name for t in parse_spec(spec).plugins if t.name in PAPERS]
    texts = list(dict.fromkeys(PAPERS[p] for p in plugins))
    cites = [v.CiteEntry(text=t, url="https://scholar.google.com/scholar?q=" +
                         "+".join(t.split(", ")[-2].split())) for t in texts]
    cites.append(v.CiteEntry(text=SMP[0], url=SMP[1]))
    if data == "sstem":
        cites.append(v.CiteEntry(text="S. Gerhard et al., Segmented anisotropic ssTEM dataset "
                                      "of neural tissue, figshare 2013", doi=SSTEM_DOI))
    return cites


def readme(ckpt: dict, cites) -> str:
    norm = ckpt["norm"]
    cfg = ckpt.get("config", {})
    lines = [f"# cellseg model: `{ckpt['spec']}`", "",
             "Semantic segmentation exported by cellseg "
             "(https://github.com/qubvel-org/segmentation_models.pytorch architectures with "
             "cellseg plugins).", "",
             f"- classes (output channels): {', '.join(ckpt['class_names'])}",
             f"- input: {ckpt['in_channels']} channel(s), 8-bit intensities (0–255); "
             f"normalised as (x / 255 − {norm['mean']}) / {norm['std']} (the training split's "
             "statistics)",
             "- output: class probabilities (softmax); the label is the arg-max over channels",
             f"- trained on: {cfg.get('data', '?')}, fold {cfg.get('fold', '?')}, "
             f"{cfg.get('epochs', '?')} epochs",
             f"- pixel size: {ckpt['pixel_nm']:.3g} nm (the training images'; rescale images "
             "of another to it)" if ckpt.get("pixel_nm") else
             "- pixel size: unknown (the training images carried none)", "", "## Cite", ""]
    lines += [f"- {c.text}" for c in cites]
    return "\n".join(lines) + "\n"


def write_package(model: nn.Module, ckpt: dict, path: Path, author: str | None = None,
                  check: bool = True) -> None:
    """Build, test (``check``: bioimageio.core's model test) and zip the package for
    ``model`` (eval mode) to ``path``."""
    import bioimageio.spec.model.v0_5 as v
    from bioimageio.core import test_model
    from bioimageio.spec import save_bioimageio_package
    from PIL import Image

    from .export import (input_sizes, run_exported, torchscript_calls, verify, write_onnx,
                         write_torchscript)

    wrapped = Probabilities(model).eval()
    fixed, stride = input_sizes(model)
    size = probe_size(model) if fixed else 256
    c, names = ckpt["in_channels"], ckpt["class_names"]
    norm = ckpt["norm"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_torchscript(wrapped, ckpt, tmp / "weights.torchscript.pt")
        write_onnx(wrapped, ckpt, tmp / "weights.onnx")
        for fmt, name in (("torchscript", "weights.torchscript.pt"), ("onnx", "weights.onnx")):
            verify(wrapped, ckpt, tmp / name, fmt)
        image = test_image(c, size)
        x = ((image / 255 - np.array(norm["mean"], np.float32)[:, None, None])
             / np.array(norm["std"], np.float32)[:, None, None])[None].astype(np.float32)
        probs = run_exported(tmp / "weights.torchscript.pt", "torchscript", x)
        np.save(tmp / "test_input.npy", image[None])
        np.save(tmp / "test_output.npy", probs)
        labels = probs[0].argmax(0)
        grey = image[0] / 255
        cover = np.concatenate([np.repeat((grey * 255).astype(np.uint8)[..., None], 3, -1),
                                overlay(grey, labels)], axis=1)
        Image.fromarray(cover).save(tmp / "cover.png")
        cites = citations(ckpt["spec"], ckpt.get("config", {}).get("data"))
        (tmp / "README.md").write_text(readme(ckpt, cites))
        physical = {"unit": "nanometer", "scale": ckpt["pixel_nm"]} if ckpt.get("pixel_nm") \
            else {}  # the training images' pixel size, where known
        space = (lambda i: v.SpaceInputAxis(id=i, size=size, **physical)) if fixed else (
            lambda i: v.SpaceInputAxis(id=i, size=v.ParameterizedSize(min=stride, step=stride),
                                       **physical))
        if c == 1:
            kwargs = v.FixedZeroMeanUnitVarianceKwargs(mean=255 * norm["mean"][0],
                                                       std=255 * norm["std"][0])
        else:
            kwargs = v.FixedZeroMeanUnitVarianceAlongAxisKwargs(
                mean=[255 * m for m in norm["mean"]], std=[255 * s for s in norm["std"]],
                axis="channel")
        inputs = [v.InputTensorDescr(
            id="image", description="8-bit intensities (0–255)",
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[f"c{i}" for i in range(c)]),
                  space("y"), space("x")],
            test_tensor=v.FileDescr(source=tmp / "test_input.npy"),
            preprocessing=[v.FixedZeroMeanUnitVarianceDescr(kwargs=kwargs)])]
        outputs = [v.OutputTensorDescr(
            id="probabilities", description="class probabilities",
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=list(names)),
                  *(v.SpaceOutputAxis(id=i, size=v.SizeReference(tensor_id="image", axis_id=i),
                                      **physical) for i in ("y", "x"))],
            test_tensor=v.FileDescr(source=tmp / "test_output.npy"))]
        data = ckpt.get("config", {}).get("data")
        plugins = [t.name for t in parse_spec(ckpt["spec"]).plugins]
        descr = v.ModelDescr(
            name=f"cellseg {parse_spec(ckpt['spec']).arch.name} "
                 f"{' '.join(plugins) or 'baseline'}"[:128],
            description=f"Semantic segmentation into {', '.join(names)}; cellseg spec "
                        f"{ckpt['spec']}"[:1024],
            authors=[v.Author(name=author or getpass.getuser())],
            cite=cites, license="CC-BY-NC-SA-3.0" if data == "sstem" else "CC-BY-4.0",
            documentation=v.FileDescr(source=tmp / "README.md"),
            covers=[v.FileDescr(source=tmp / "cover.png")],
            tags=["semantic-segmentation", "electron-microscopy", "cellseg", *plugins],
            inputs=inputs, outputs=outputs,
            weights=v.WeightsDescr(
                torchscript=v.TorchscriptWeightsDescr(source=tmp / "weights.torchscript.pt",
                                                      pytorch_version=torch.__version__.split("+")[0]),
                onnx=v.OnnxWeightsDescr(source=tmp / "weights.onnx",
                                        opset_version=_opset(tmp / "weights.onnx"))),
            config={"cellseg": {"spec": ckpt["spec"], "class_names": list(names)}})
        with torchscript_calls():  # the test runs the TorchScript weights too
            summary = test_model(descr) if check else None
        if summary is not None and summary.status != "passed":
            failed = [f"{d.name}: {d.errors[0].msg if d.errors else d.status}"
                      for d in summary.details if d.status != "passed"]
            raise DataError(f"the BioImage.IO model test failed: {'; '.join(failed)[:300]}")
        save_bioimageio_package(descr, output_path=path)


def _opset(path: Path) -> int:
    import onnx

    return max(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))
