"""Exports: every plugin to TorchScript and ONNX (checked against PyTorch), BioImage.IO
packages that pass bioimageio.core's model test, ONNX Runtime prediction, bad input."""

import warnings
import zipfile

import numpy as np
import onnx
import pytest
import tifffile
import torch

from cellseg_plugins.cli.main import main
from conftest import EVERY_PLUGIN, checkpoint, small_spec
from cellseg_plugins.engine.export import (ExportError, export_checkpoint,
                                           read_metadata, run_exported)

@pytest.mark.parametrize("spec", EVERY_PLUGIN)
def test_every_plugin_exports_to_torchscript_and_onnx(tmp_path, spec):
    warnings.simplefilter("ignore")
    path, model = checkpoint(tmp_path, spec)
    ckpt = torch.load(path, weights_only=True)
    for fmt in ("torchscript", "onnx"):
        out = export_checkpoint(path, fmt)
        x = torch.randn(1, 1, 96, 64)  # another size than the trace's
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(run_exported(out, fmt, x.numpy()) - expected).max() <= 1e-4
        assert read_metadata(out, fmt)["class_names"] == ckpt["class_names"]
        if fmt == "onnx" and spec.endswith("+feedback_self"):  # attention stays one node
            assert "Attention" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_dpt_with_bottleneck_plugins_exports(tmp_path):
    """DPT's encoder hooks pass (features, prefix tokens) through the trace too."""
    warnings.simplefilter("ignore")
    path, model = checkpoint(tmp_path, small_spec("dpt") + "+scse+frem+feedback_convlstm")
    x = torch.randn(1, 1, 64, 64)  # DPT takes only its img_size
    with torch.no_grad():
        expected = model(x).numpy()
    for fmt in ("torchscript", "onnx"):
        out = export_checkpoint(path, fmt)
        assert np.abs(run_exported(out, fmt, x.numpy()) - expected).max() <= 1e-4


def test_torchscript_export_does_not_print_torchs_deprecation_notes(tmp_path, recwarn):
    """TorchScript is what the user (or the BioImage Model Zoo) asked for: torch.jit's
    FutureWarnings (eight lines an export on torch 2.14) and the tracer's notes on shape
    tests (two more on an LFA model; the export is checked at a second size instead) are not
    shown; other warnings are."""
    warnings.simplefilter("always")
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)+lfa(m=3)")
    out = export_checkpoint(path, "torchscript")
    read_metadata(out, "torchscript")
    run_exported(out, "torchscript", np.zeros((1, 1, 64, 64), np.float32))
    shown = [f"{w.category.__name__}: {w.message}" for w in recwarn]
    assert not [w for w in shown if "torch.jit" in w or "TracerWarning" in w], shown
    warnings.warn("`torch.jit.other` is deprecated", FutureWarning)  # the filter is scoped
    assert [w for w in recwarn if "torch.jit.other" in str(w.message)]


def test_a_torchscript_archive_is_named_after_its_file(tmp_path):
    """torch.jit.save names the archive's root folder after the file it writes: the export
    is written under its own name (in a temporary folder, removed after), not as a
    '.tmp-XXXX-model.torchscript' that an unzipped archive showed."""
    import zipfile

    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    out = export_checkpoint(path, "torchscript", tmp_path / "cells.torchscript.pt")
    assert {name.split("/")[0] for name in zipfile.ZipFile(out).namelist()} == {
        "cells.torchscript"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.torchscript.pt", "model.pt"]


def test_an_export_beside_a_resuming_run_keeps_its_temporary_folder(tmp_path, monkeypatch):
    """A run resuming in the checkpoint's folder deletes the temporary files a killed process
    left (remove_stale); an export writing there at that moment keeps its own."""
    import cellseg_plugins.engine.export as export
    from cellseg_plugins.engine.checkpoint import remove_stale

    write = export.write_torchscript

    def resumed_meanwhile(model, ckpt, path):
        write(model, ckpt, path)
        remove_stale(path.parent.parent)  # the run folder, as `cellseg train` resuming does

    monkeypatch.setattr(export, "write_torchscript", resumed_meanwhile)
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    out = export_checkpoint(path, "torchscript")
    assert read_metadata(out, "torchscript")["spec"] == "classic_unet(width=4)"


def test_training_only_modules_vanish_from_the_export(tmp_path):
    plain, _ = checkpoint(tmp_path, "classic_unet(width=4)", "plain.pt")
    extra, _ = checkpoint(tmp_path, "classic_unet(width=4)+frem+bottleneck_supervision"
                                    "+bottleneck_dropout", "extra.pt")
    ops = [sorted(n.op_type for n in onnx.load(str(export_checkpoint(p, "onnx"))).graph.node)
           for p in (plain, extra)]
    assert ops[0] == ops[1]  # no scaling, no auxiliary head, no dropout


def test_export_refuses_bad_input_in_one_line(tmp_path, capsys):
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    (tmp_path / "model.onnx").write_text("keep me")
    cases = [(["export", str(path), "--format", "keras"], "--format 'keras': expected one of"),
             (["export", str(path)], "model.onnx exists; choose another --out or pass --overwrite"),
             (["export", str(tmp_path / "nope.pt")], "does not exist"),
             (["export", str(path), "--out", str(tmp_path / "no" / "m.onnx")], "does not exist"),
             (["export", str(path), "--opset", "12"], "--opset 12: expected 17 … 23"),
             (["export", str(path), "--format", "torchscript", "--opset", "18"],
              "--opset 18: only with --format onnx"),
             (["export", str(path), "--out", str(tmp_path / "m.onnx"), "--author", "Ada"],
              "--author 'Ada': only with --format bioimageio")]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and fragment in err and err.count("\n") == 1, err
    assert (tmp_path / "model.onnx").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt"]


def test_an_export_given_where_a_checkpoint_is_expected_is_one_line(tmp_path, capsys):
    """eval, export and predict said "unreadable (RuntimeError)" of a TorchScript export, with
    torch's warning above it, and predict --runtime onnx of a truncated .onnx file ended in
    protobuf's DecodeError traceback, and one that ONNX Runtime cannot run (an opset it
    does not know) in ONNX Runtime's own."""
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    exports = {kind: export_checkpoint(path, fmt, check=False) for kind, fmt in
               [("a TorchScript export", "torchscript"), ("an ONNX model", "onnx"),
                ("a BioImage Model Zoo package", "bioimageio")]}
    tifffile.imwrite(tmp_path / "em.tif", np.zeros((64, 64), np.uint8))
    for kind, exported in exports.items():
        for argv in (["eval", exported], ["export", exported, "--out", tmp_path / "again.onnx"]):
            with pytest.raises(SystemExit) as e:
                main([str(a) for a in argv])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err == (f"error: {str(exported)!r} is {kind}, not a "
                                                 "checkpoint: give the checkpoint (.pt) it was "
                                                 "exported from\n"), err
    (tmp_path / "cut.onnx").write_bytes(exports["an ONNX model"].read_bytes()[:500])
    with pytest.raises(SystemExit) as e:
        main(["predict", str(tmp_path / "cut.onnx"), str(tmp_path / "em.tif"), "--runtime",
              "onnx", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"error: {tmp_path / 'cut.onnx'} is unreadable as an "
                                         "ONNX model (DecodeError)\n"), err
    # a whole file that this ONNX Runtime cannot run (an opset it does not know, as a newer
    # exporter writes): ONNX Runtime's Fail traceback before
    newer = onnx.load(str(exports["an ONNX model"]))
    newer.opset_import[0].version = 99
    onnx.save(newer, str(tmp_path / "newer.onnx"))
    with pytest.raises(SystemExit) as e:
        main(["predict", str(tmp_path / "newer.onnx"), str(tmp_path / "em.tif"), "--runtime",
              "onnx", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {tmp_path / 'newer.onnx'}: ONNX "
                                                "Runtime ") and "Opset 99" in err, err
    assert err.count("\n") == 1 and "onnxruntime_src" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "again.onnx").exists()


def test_a_mismatching_export_is_refused_and_not_kept(tmp_path, monkeypatch):
    import cellseg_plugins.engine.export as export

    path, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    monkeypatch.setattr(export, "run_exported", lambda p, f, x: np.zeros((1, 3, 128, 128)))
    with pytest.raises(ExportError, match="differs from the PyTorch model"):
        export_checkpoint(path, "torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_lfa_exports_to_onnx_by_trace_and_global_attention_by_torch_export(tmp_path,
                                                                           monkeypatch):
    import cellseg_plugins as cs
    from cellseg_plugins.engine import export

    def model(spec):
        return cs.create_model(spec, classes=3).eval()

    lfa = model("classic_unet(width=4)+lfa(m=3,stages=(1,))")
    assert export.traced_onnx_fits(lfa, 18) and not export.traced_onnx_fits(lfa, 23)
    assert not export.traced_onnx_fits(model("classic_unet(width=4)"), 18)
    # Feedback Attention's full-resolution attention keeps its Attention node (torch.export,
    # opset 23); bottleneck attention's small map is traced with LFA
    fine = model("classic_unet(width=4)+lfa+feedback_self")
    assert not export.traced_onnx_fits(fine, 18) and export.default_opset(fine) == 23
    coarse = model("classic_unet(width=4)+lfa+bottleneck_attention")
    assert export.traced_onnx_fits(coarse, 18) and export.default_opset(coarse) == 18
    assert export.default_opset(model("classic_unet(width=4)+bottleneck_attention")) == 23
    ckpt = {"in_channels": 1}
    graph = export.traced_onnx(lfa, ckpt, 18, fixed=False).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "height", "width"]
    real = torch.onnx.export

    def legacy_gone(*args, dynamo=True, **kw):
        if not dynamo:
            raise RuntimeError("the TorchScript-based exporter was removed")
        return real(*args, dynamo=dynamo, **kw)

    monkeypatch.setattr(torch.onnx, "export", legacy_gone)
    assert export.traced_onnx(lfa, ckpt, 18, fixed=False) is None
    path, small = checkpoint(tmp_path, "classic_unet(width=4)+lfa(m=3,stages=(3,))")
    out = export_checkpoint(path, "onnx")  # by the torch.export-based exporter, and checked
    x = torch.randn(1, 1, 48, 80)
    with torch.no_grad():
        assert np.abs(run_exported(out, "onnx", x.numpy()) - small(x).numpy()).max() <= 1e-4


def test_export_tolerance_follows_the_logits_scale(tmp_path, monkeypatch):
    from cellseg_plugins.engine import export

    class Loud(torch.nn.Module):  # logits of 10³, as a deep untrained encoder gives
        def forward(self, x):
            return 1000 * x.repeat(1, 3, 1, 1)

    ckpt = {"in_channels": 1}
    for shift, ok in ((0.05, True), (0.5, False)):  # 5e-5 and 5e-4 of the scale
        monkeypatch.setattr(export, "run_exported", lambda p, f, x: 1000 * x.repeat(3, 1) + shift)
        if ok:
            assert export.verify(Loud(), ckpt, tmp_path, "onnx") <= export.TOLERANCE
        else:
            with pytest.raises(ExportError, match="of its logits' scale"):
                export.verify(Loud(), ckpt, tmp_path, "onnx")


def test_bioimageio_package_passes_the_zoo_model_test(tmp_path):
    from bioimageio.core import test_model
    from bioimageio.spec import load_model_description

    warnings.simplefilter("ignore")
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)+frem+attention_gate")
    torch.save({**torch.load(path, weights_only=False), "pixel_nm": 4.6}, path)  # ssTEM's
    package = export_checkpoint(path, "bioimageio", check=False)
    summary = test_model(package)
    assert summary.status == "passed", summary.format()
    descr = load_model_description(package)
    assert [str(c) for c in descr.outputs[0].axes[1].channel_names] == ["c0", "c1", "c2"]
    norm = next(p for p in descr.inputs[0].preprocessing
                if p.id == "fixed_zero_mean_unit_variance")
    assert norm.kwargs.mean == pytest.approx(127.5) and norm.kwargs.std == pytest.approx(51.0)
    assert any("Feature Random Enhancement" in c.text for c in descr.cite)
    assert descr.config.model_extra["cellseg"]["spec"].startswith("classic_unet")
    with zipfile.ZipFile(package) as zipped:  # the pixel size in its README too
        assert "- pixel size: 4.6 nm (the training images'" in \
            zipped.read("README.md").decode()
    for axes in (descr.inputs[0].axes, descr.outputs[0].axes):  # the pixel size it expects
        assert [(a.id, a.unit, a.scale) for a in axes[2:]] == [("y", "nanometer", 4.6),
                                                                ("x", "nanometer", 4.6)]


def test_predict_with_onnx_runtime_agrees_with_torch(tmp_path, capsys):
    # the paper's LFA window at every skip, exported by trace, at tiles of another size
    path, _ = checkpoint(tmp_path, "classic_unet(width=4)+lfa(m=7)")
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, (np.random.default_rng(0).random((300, 200)) * 255).astype(np.uint8))
    for runtime in ("torch", "onnx"):
        with pytest.raises(SystemExit) as e:
            main(["predict", str(path), str(image), "--out", str(tmp_path / runtime),
                  "--runtime", runtime, "--tile", "128"])
        assert e.value.code == 0, capsys.readouterr().err
    a, b = (tifffile.imread(tmp_path / r / "image.tif") for r in ("torch", "onnx"))
    assert a.shape == (300, 200) and (a == b).mean() >= 0.999
