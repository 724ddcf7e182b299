import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli


def test_list_json_has_every_entry(capsys):
    code, out, _ = cli(capsys, "list", "--json")
    data = json.loads(out)
    assert code == 0
    assert {"unet", "fpn", "scse"} <= set(data)
    assert data["scse"]["kind"] == "plugin"
    assert {p["name"] for p in data["unet"]["params"]} >= {"encoder", "encoder_depth"}


def test_list_pattern_and_kind(capsys):
    code, out, _ = cli(capsys, "list", "*net*", "--json")
    assert code == 0 and sorted(json.loads(out)) == [
        "classic_unet", "linknet", "manet", "pspnet", "unet", "unetplusplus", "upernet"]
    code, out, _ = cli(capsys, "list", "plain*", "--kind", "encoder", "--json")
    assert "plain8" in json.loads(out)
    code, out, _ = cli(capsys, "list", "--kind", "plugin")
    assert code == 0 and "scse" in out and "unet " not in out
    code, out, _ = cli(capsys, "list", "feedback", "--json")  # no wildcard: a name's part
    assert sorted(json.loads(out)) == ["feedback_attention", "feedback_convlstm",
                                       "feedback_self", "feedback_st"]
    code, out, err = cli(capsys, "list", "resnet34")
    assert code == 0 and out == "" and err == ("nothing matches 'resnet34' (encoders are "
                                               "listed with --kind encoder)\n")


@pytest.mark.parametrize("argv, fragment", [
    (["list", "--kind", "model"], "'model' is not one of"),
    (["list", "--bogus"], "No such option"),
])
def test_cli_usage_errors_are_one_line(capsys, argv, fragment):
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error:") and fragment in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_console_script_bad_spec_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "cellseg_plugins.cli.main", "bench", "unet+scsee",
                           "--steps", "1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "did you mean 'scse'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("spec, fragment", [
    ("unet+lfaa", "did you mean 'lfa'"),
    ("unet+lfa(k=3)", "unknown parameter 'k' (valid: m, query, residual, stages, reduction, fusion, decoder_norm)"),
    ("unet+frem(B='eight')", "B: expected int | float, got str 'eight'"),
    ("unet+frem(B=0)", "out of range"),
    ("unet+frem(8)", "positional argument not allowed"),
    ("pspnet+lfa", "does not support arch 'pspnet'"),
    ("unet+frem+frem", "may appear only once"),
    ("unet+feedback_self+feedback_st", "cannot be combined"),
])
def test_train_rejects_bad_specs_in_one_line(capsys, tmp_path, spec, fragment):
    code, _, err = cli(capsys, "train", spec, "--out", str(tmp_path / "run"))
    assert code == 2 and fragment in err and err.count("\n") == 1 and "column" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["study", "run", "--help"]])
def test_help_imports_no_torch(argv):
    """The CLI defers heavy imports to the commands that need them (``cellseg --help`` is
    instant)."""
    code = ("import sys\nfrom cellseg_plugins.cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'segmentation_models_pytorch', 'numpy')"
            " if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["train", "unet", "--optimizer", "lbfgs"], "--optimizer 'lbfgs': expected one of adam, sgd"),
    (["train", "unet", "--data", "/nonexistent"], "--data '/nonexistent': not 'synthetic', 'sstem'"),
    (["train", "unet+lfa(m=4)"], "m=4: the window size must be odd"),
    (["train", "unet", "--epochs", "0"], "--epochs 0: must be ≥ 1"),
    (["eval", "/nonexistent.pt"], "checkpoint '/nonexistent.pt' does not exist"),
    (["data", "fetch", "mnist"], "unknown data set 'mnist'"),
    (["train", "unet", "--classes", "sstem4"], "--classes 'sstem4' applies to --data sstem only"),
    (["train", "unet", "--class-map", "0:a,1:b"], "--class-map applies to image folders"),
    (["predict", "m.onnx", "x.tif", "--runtime", "onnx", "--device", "cuda"],
     "--device cuda: --runtime onnx runs ONNX Runtime on the CPU"),
])
def test_cli_bad_input(capsys, tmp_path, argv, fragment):
    code, _, err = cli(capsys, *argv, *(["--out", tmp_path / "o"] if argv[0] == "train" else []))
    assert code == 2 and fragment in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["train", "unet"], ["cv", "unet"], ["tune", "unet", "--search", "train.lr=float:1e-4:1e-2"],
    ["study", "run", "studies/sstem5.toml"], ["study", "report", "results/sstem5-cpu"],
    ["predict", "m.pt", "x.tif"], ["data", "fetch", "sstem", "--root"],
])
@pytest.mark.parametrize("under", [False, True])
def test_a_folder_option_naming_a_file_is_one_line_before_any_work(capsys, tmp_path, argv, under):
    """--out (--root) that is a file, or lies under one, is refused before anything runs."""
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    target = file / "sub" if under else file
    args = [*argv, target] if argv[-1] == "--root" else [*argv, "--out", target]
    code, _, err = cli(capsys, *args)
    what = f" lies in '{file}', which" if under else ""
    assert code == 2 and err.count("\n") == 1, err
    assert f"Invalid value for '--{'root' if argv[-1] == '--root' else 'out'}': " \
           f"'{target}'{what} is a file, not a folder (see 'cellseg {argv[0]}" in err, err
    assert file.read_text() == "keep me" and list(tmp_path.iterdir()) == [file]


@pytest.mark.parametrize("argv, default", [
    (["train", "unet"], "runs/latest"),
    (["study", "run", "STUDY"], "runs/study/sstem5-cpu"),
])
def test_a_default_output_folder_blocked_by_a_file_is_one_line(capsys, tmp_path, monkeypatch,
                                                               argv, default):
    """Without --out, the default folder is checked up front like a given one."""
    study = Path("studies/sstem5.toml").resolve()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("keep me")
    code, _, err = cli(capsys, *[str(study) if a == "STUDY" else a for a in argv],
                       *(["--scale", "cpu"] if argv[0] == "study" else []))
    assert code == 2 and err.count("\n") == 1, err
    assert f"'{default}' lies in 'runs', which is a file, not a folder" in err, err
    assert (tmp_path / "runs").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_an_unwritable_folder_and_a_refusing_file_system_are_one_line(capsys, tmp_path,
                                                                       monkeypatch):
    import os
    from pathlib import Path

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != tmp_path and real_access(p, mode))
    code, _, err = cli(capsys, "train", "unet", "--out", tmp_path / "run")
    assert code == 2 and f"'{tmp_path / 'run'}' lies in '{tmp_path}', which is not writable" \
        in err and err.count("\n") == 1, err
    monkeypatch.undo()

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "mkdir", full)
    code, _, err = cli(capsys, "data", "fetch", "sstem", "--from", tmp_path, "--root",
                       tmp_path / "data")
    assert code == 1 and err == f"error: '{tmp_path / 'data'}': No space left on device\n", err
