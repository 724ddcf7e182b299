"""Models that leave cellseg: TorchScript, ONNX and BioImage Model Zoo packages.

Every export is the checkpoint's model in eval mode, so training-only parts vanish (FREM
returns its input, auxiliary heads and round-1 losses are not computed, dropout is off), and
it is checked when written: the exported model's output must equal PyTorch's within
:data:`TOLERANCE` of the logits' scale on random inputs at two sizes, else nothing is left
on disk. The model takes the normalised image ((x − mean) / std, x scaled to [0, 1]) and
returns class logits; the normalisation, class names and spec travel with it (TorchScript
extra file, ONNX metadata, the BioImage.IO preprocessing).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..blocks import GlobalAttention
from ..hooks import probe_size
from ..registry import parse_spec
from .checkpoint import load_checkpoint, model_from_checkpoint, publish
from .data import DataError

FORMATS = ("torchscript", "onnx", "bioimageio")
SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "bioimageio": ".bioimageio.zip"}
TOLERANCE = 1e-4  # of max(1, the largest |logit|): fp32 sums in another order differ by that
META = "cellseg.json"


class ExportError(DataError):
    """An export that cannot be made or does not reproduce the model; one line."""


def metadata(ckpt: dict) -> dict:
    """What an exported model carries besides its weights (``pixel_nm``: the training
    images' pixel size, None where unknown or in checkpoints made before it was kept)."""
    return {"spec": ckpt["spec"], "class_names": ckpt["class_names"],
            "in_channels": ckpt["in_channels"], "norm": ckpt["norm"],
            "pixel_nm": ckpt.get("pixel_nm")}


def input_sizes(model) -> tuple[bool, int]:
    """(fixed, stride): whether the arch takes one input size only (a ViT encoder's
    ``strict_img_size``), else the stride its height and width must be multiples of."""
    fixed = any(getattr(m, "strict_img_size", False) for m in model.modules())
    return fixed, getattr(getattr(model, "encoder", None), "output_stride", 32)


def example_input(model, ckpt: dict, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = probe_size(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, ckpt["in_channels"], size, size, generator=g)


@contextmanager
def torchscript_calls():
    """torch.jit's calls without PyTorch's notes that TorchScript is deprecated (eight lines
    an export): TorchScript is the format the user asked for, and one of the two the
    BioImage Model Zoo runs. Nor the tracer's "might not generalize to other inputs" on
    shape tests (a skip's size against the decoder's): :func:`verify` runs every export at a
    second size and refuses one that differs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def write_torchscript(model, ckpt: dict, path: Path) -> None:
    with torch.no_grad(), torchscript_calls():
        traced = torch.jit.trace(model, example_input(model, ckpt), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={META: json.dumps(metadata(ckpt))})


def default_opset(model) -> int:
    """18 where the model exports by trace (:func:`traced_onnx_fits`); else 23 where it has
    global attention (ONNX then keeps it as one Attention node, no (HW)² map in the graph);
    else 18."""
    if traced_onnx_fits(model, 18):
        return 18
    return 23 if any(isinstance(m, GlobalAttention) for m in model.modules()) else 18


def write_onnx(model, ckpt: dict, path: Path, opset: int | None = None) -> None:
    """The model as ONNX for any batch and (unless the arch fixes it) any multiple of its
    stride as height and width: by the TorchScript-based exporter where
    :func:`traced_onnx_fits`, else (or if that exporter fails) by the torch.export-based one."""
    import onnx

    fixed, stride = input_sizes(model)
    opset = opset or default_opset(model)
    proto = traced_onnx(model, ckpt, opset, fixed) if traced_onnx_fits(model, opset) else None
    if proto is None:
        dims = {0: torch.export.Dim("batch", min=1, max=1024)}
        if not fixed:  # any multiple of the arch's stride
            dims[2] = stride * torch.export.Dim("h", min=1, max=4096 // stride)
            dims[3] = stride * torch.export.Dim("w", min=1, max=4096 // stride)
        with torch.no_grad():
            program = torch.onnx.export(model, (example_input(model, ckpt),), dynamo=True,
                                        opset_version=opset, input_names=["image"],
                                        output_names=["logits"], dynamic_shapes={"x": dims},
                                        verbose=False)
        proto = program.model_proto
    onnx.helper.set_model_props(proto, {META: json.dumps(metadata(ckpt))})
    onnx.save(proto, str(path))


def traced_onnx_fits(model, opset: int) -> bool:
    """Whether to export by trace: the model has LFA's windowed attention (modules marked
    ``onnx_by_trace``), whose m² window slices cost the torch.export-based exporter minutes of
    symbolic-shape work (``+lfa(m=7)``: 537 s on 2 CPU cores; docs/performance.md) and the
    TorchScript-based one seconds, with the same ONNX Runtime speed; and no global attention
    over a fine map (Feedback Attention's), which keeps its one Attention node only through
    the torch.export-based exporter (opset 23; the TorchScript-based one stops at opset 20).
    Global attention over the bottleneck (``coarse``) is traced as MatMul and Softmax: its
    (HW)² map is 256² for a 256² image at stride 16."""
    return (opset <= 20 and any(getattr(m, "onnx_by_trace", False) for m in model.modules())
            and not any(isinstance(m, GlobalAttention) and not m.coarse
                        for m in model.modules()))


def traced_onnx(model, ckpt: dict, opset: int, fixed: bool):
    """The ONNX model by PyTorch's TorchScript-based exporter (deprecated since PyTorch 2.9),
    or None where it fails or is gone. The trace keeps the input's shape symbolic (batch,
    and height and width unless ``fixed``); :func:`verify` checks it at a second size."""
    import io

    import onnx

    axes = {0: "batch", **({} if fixed else {2: "height", 3: "width"})}
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and trace notes
            torch.onnx.export(model, (example_input(model, ckpt),), buffer, dynamo=False,
                              opset_version=opset, input_names=["image"],
                              output_names=["logits"],
                              dynamic_axes={"image": axes, "logits": axes})
    except Exception:  # noqa: BLE001 — the torch.export-based exporter is the fallback
        return None
    return onnx.load_from_string(buffer.getvalue())


def run_exported(path: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    """Logits of an exported model (``torchscript`` or ``onnx``) for x (N, C, H, W) float32."""
    if fmt == "torchscript":
        with torch.no_grad(), torchscript_calls():
            return torch.jit.load(str(path))(torch.from_numpy(x)).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def verify(model, ckpt: dict, path: Path, fmt: str) -> float:
    """Max |exported − PyTorch| / max(1, max |PyTorch|) on fresh random inputs: the trace's
    size with batch 1, and batch 2 one stride taller (the same size where the arch fixes it);
    ExportError above TOLERANCE. Relative to the logits' scale, as a deep untrained encoder's
    logits reach 10³ and fp32 rounding grows with them."""
    fixed, stride = input_sizes(model)
    x = example_input(model, ckpt, batch=1, seed=1)
    g = torch.Generator().manual_seed(2)
    taller = torch.randn(2, x.shape[1], x.shape[2] + (0 if fixed else stride), x.shape[3],
                         generator=g)
    error = 0.0
    for x in (x, taller):
        with torch.no_grad():
            expected = model(x).numpy()
        got = run_exported(path, fmt, x.numpy())
        scale = max(1.0, float(np.abs(expected).max()))
        error = max(error, float(np.abs(got - expected).max()) / scale
                    if got.shape == expected.shape else float("inf"))
    if not error <= TOLERANCE:
        raise ExportError(f"the {fmt} export differs from the PyTorch model by {error:.2e} of "
                          f"its logits' scale (> {TOLERANCE}); nothing written")
    return error


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path | None = None,
                      opset: int | None = None, overwrite: bool = False,
                      author: str | None = None, check: bool = True) -> Path:
    """Export ``checkpoint`` as ``fmt`` (torchscript | onnx | bioimageio) to ``out``
    (default: beside the checkpoint). Written to a temporary file, checked, then renamed;
    ``check=False`` skips only the BioImage.IO model test (the weights are always checked)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if opset is not None and not 17 <= opset <= 23:
        raise ExportError(f"--opset {opset}: expected 17 … 23")
    if opset is not None and fmt != "onnx":
        raise ExportError(f"--opset {opset}: only with --format onnx")
    if author is not None and fmt != "bioimageio":
        raise ExportError(f"--author {author!r}: only with --format bioimageio")
    needs = {"onnx": ("onnx", "onnxscript", "onnxruntime"),
             "bioimageio": ("onnx", "onnxscript", "onnxruntime", "bioimageio.core")}
    for module in needs.get(fmt, ()):
        if importlib.util.find_spec(module) is None:
            raise ExportError(f"--format {fmt} needs {module}: pip install 'cellseg[export]'")
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    out = Path(out) if out else checkpoint.with_name(checkpoint.stem + SUFFIX[fmt])
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; choose another --out or pass --overwrite")
    if not out.parent.is_dir():
        raise ExportError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    model = model_from_checkpoint(ckpt).eval()
    # written under its own name in a temporary folder beside ``out``: TorchScript names
    # the archive's root folder after the file (not named *.partial: a run folder's
    # remove_stale deletes files so named, and an export may run beside the training)
    folder = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    tmp = folder / out.name
    try:
        if fmt == "bioimageio":
            from .bioimageio import write_package
            write_package(model, ckpt, tmp, author, check)
        else:
            try:
                (write_torchscript if fmt == "torchscript" else write_onnx)(
                    model, ckpt, tmp, *([opset] if fmt == "onnx" else []))
            except Exception as e:
                plugins = ", ".join(t.name for t in parse_spec(ckpt["spec"]).plugins) or "none"
                raise ExportError(f"{ckpt['spec']} (plugins: {plugins}) does not export to "
                                  f"{fmt}: {' '.join(str(e).split())[:200]}") from None
            verify(model, ckpt, tmp, fmt)
        publish(tmp, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def read_metadata(path: Path, fmt: str) -> dict:
    """The cellseg metadata stored in an exported TorchScript or ONNX file."""
    if fmt == "torchscript":
        files = {META: ""}
        with torchscript_calls():
            torch.jit.load(str(path), _extra_files=files)
        return json.loads(files[META])
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError for a truncated or foreign file
        raise ExportError(f"{path} is unreadable as an ONNX model ({type(e).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META not in props:
        raise ExportError(f"{path} is not an ONNX model exported by cellseg")
    return json.loads(props[META])
