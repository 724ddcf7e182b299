"""Study files: parsing, bad files in one line, the paired statistics, reports from stored runs."""

import json
import math
import shlex
import sys
from pathlib import Path

import pytest

from cellseg_plugins.cli.main import main
from cellseg_plugins.engine.study import StudyError, load_study, paired_tests, report

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[study]
title = "tiny"
data = "synthetic"
folds = 3
seeds = 1
epochs = 1
crop = 64
batch_size = 32
device = "cpu"
vars = { net = "classic_unet(width=4)" }

[scale.two]
seeds = 2

[[row]]
name = "base"
spec = "{net}"
paper = 70.0

[[row]]
name = "+ frem"
spec = "{net}+frem(B=2)"
base = "base"
paper = 72.5
"""


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["sstem4", "sstem5", "smp"])
@pytest.mark.parametrize("scale", ["paper", "cpu"])
def test_the_papers_study_files_parse_at_every_scale(name, scale):
    study = load_study(ROOT / "studies" / f"{name}.toml", scale)
    assert study.rows and study.config.data == "sstem"
    for row in study.rows:
        assert row.base is None or row.base in {r.name for r in study.rows}
    if scale == "cpu":
        assert (study.folds, study.seeds, study.config.epochs) == (5, 1, 60)
    else:
        assert (study.folds, study.seeds) == (5, 3) and study.config.epochs >= 1500


def test_scale_overrides_settings_and_vars(tmp_path):
    study = load_study(write(tmp_path, TINY), "two")
    assert study.seeds == 2 and study.rows[1].spec == "classic_unet(width=4)+frem(B=2)"
    assert load_study(write(tmp_path, TINY)).seeds == 1


@pytest.mark.parametrize("edit, fragment", [
    (("epochs = 1", "epochz = 1"), "[study] epochz: unknown key"),
    (("epochs = 1", "epochs = 0"), "epochs=0: must be ≥ 1"),
    (("epochs = 1", 'epochs = "1"'), "epochs='1': expected int"),
    (('base = "base"', 'base = "nope"'), "row '+ frem' base: 'nope' is not a row"),
    (('spec = "{net}"', 'spec = "{nett}"'), "row 1 spec: unknown variable 'nett'"),
    (('spec = "{net}"', 'spec = "{net}+lfa(k=1)"'), "row 1 spec: bad model spec"),
    (('name = "+ frem"', 'name = "base"'), "row 2 name: 'base' is used twice"),
    (("paper = 70.0", 'paper = "high"'), "row 1 paper: expected the paper's mIoU"),
    (("[scale.two]", "[scales.two]"), "[scales]: unknown table"),
    (("seeds = 1", "seeds = -1"), "[study] seeds: -1 is not a positive integer"),
    (("folds = 3", "folds = 3\nwat = 1"), "[study] wat: unknown key"),
    (("[[row]]", "[[row]]\nlabel = 1"), "row 1 label: unknown key"),
    (("paper = 72.5", "paper = 72.5\ntrain = { fold = 1 }"),
     "row 2 train: 'fold' is not a training option a row may set"),
    (("epochs = 1", "epochs = 1\nseed = 3"), "[study] seed: the runs use seeds 0 … seeds − 1"),
    # crops the data or a row's model refuse: found before any run, not once per run
    (("crop = 64", "crop = 7"), "row 'base': crop=7: this model takes sides"),
    (("crop = 64", "crop = 512"), "row 'base': --crop 512: image synthetic00 is 256×256"),
    (("paper = 72.5", "paper = 72.5\ntrain = { crop = 8 }"),
     "row '+ frem': crop=8: this model takes sides"),
    (("paper = 72.5", 'paper = 72.5\n[[compare]]\nrow = "+ frem"\nbase = "nope"'),
     "compare 1 base: 'nope' is not a row of this file"),
    (("paper = 72.5", 'paper = 72.5\n[[compare]]\nrow = "base"\nbase = "base"'),
     "compare 1 base: 'base' is the row itself"),
    (("paper = 72.5", 'paper = 72.5\n[[compare]]\nrow = "base"\nagainst = "x"'),
     "compare 1 against: unknown key (valid: base, note, row)"),
])
def test_bad_study_files_fail_in_one_line_naming_the_key(tmp_path, capsys, edit, fragment):
    path = write(tmp_path, TINY.replace(*edit, 1))
    with pytest.raises(SystemExit) as e:
        main(["study", "run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_scale_and_bad_toml(tmp_path):
    with pytest.raises(StudyError, match=r"\[scale.two\] fold: every row runs on every fold"):
        load_study(write(tmp_path, TINY.replace("seeds = 2", "seeds = 2\nfold = 1")), "two")
    with pytest.raises(StudyError, match=r"--scale big: no \[scale.big\] table \(the file has: two\)"):
        load_study(write(tmp_path, TINY), "big")
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study(write(tmp_path, "[study\n"))


def test_paired_statistics_against_hand_computed_values():
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t = 0.02 / (0.01 / √3) = 3.4641 on 2
    # degrees of freedom: two-sided p = 0.07418; Wilcoxon, n = 3, all positive: p = 2/8
    out = paired_tests([0.71, 0.72, 0.73], [0.70, 0.70, 0.70])
    assert out["n"] == 3 and math.isclose(out["mean"], 0.02) and math.isclose(out["std"], 0.01)
    assert math.isclose(out["t_p"], 0.074180, rel_tol=1e-4)
    assert math.isclose(out["wilcoxon_p"], 0.25)
    same = paired_tests([0.5, 0.6], [0.5, 0.6])
    assert same["mean"] == 0 and same["t_p"] is None and same["wilcoxon_p"] is None


def fake_runs(folder: Path, study, mious: dict[str, list[float]]):
    """Stored run results as `cellseg study run` leaves them (no training)."""
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({**study.to_json(), "command": "cellseg x",
                                                   "machine": {"cpu": "test cpu"}}))
    for row in study.rows:
        for f, miou in enumerate(mious[row.name]):
            rd = folder / row.slug / f"fold{f}_seed0"
            rd.mkdir(parents=True)
            (rd / "test.json").write_text(json.dumps(
                {"miou": miou, "iou": {"a": miou - 0.1, "b": miou + 0.1}}))
            (rd / "metrics.csv").write_text("epoch,seconds\n1,1800\n")


def test_report_from_stored_runs(tmp_path):
    study = load_study(write(tmp_path, TINY))
    fake_runs(tmp_path / "runs", study, {"base": [0.70, 0.70, 0.70], "+ frem": [0.71, 0.72, 0.73]})
    unfinished = tmp_path / "runs" / "base" / "fold0_seed1"  # killed: no test.json
    unfinished.mkdir()
    (unfinished / "metrics.csv").write_text("epoch,seconds\n1,3600\n")
    result = report(tmp_path / "runs", tmp_path / "table")
    gain = result["rows"][1]["gain"]
    assert math.isclose(gain["mean"], 0.02) and math.isclose(gain["wilcoxon_p"], 0.25)
    table = (tmp_path / "table" / "table.md").read_text()
    assert "| + frem | 3/3 | 62.00 ± 1.00 | 82.00 ± 1.00 | **72.00 ± 1.00** | +2.00 ± 1.00 | " \
           "0.074 | 0.250 | 72.50 | +2.50 |" in table
    assert "training wall time of the runs: 3.00 h" in table
    assert "- command: `cellseg x`; machine: test cpu, ? threads; torch ?" in table
    assert (tmp_path / "table" / "gains.png").stat().st_size > 1000
    rows = (tmp_path / "table" / "table.csv").read_text().splitlines()
    assert rows[0].startswith("row,spec,base,runs,a_mean") and len(rows) == 3


@pytest.mark.parametrize("bf16, says", [("emulated", ", bf16 emulated (no AVX-512 BF16 or AMX)"),
                                        ("native", ", bf16 native (AVX-512 BF16 or AMX)"),
                                        (None, "")])  # an older study.json: not recorded
def test_machine_line_names_the_cpu_bf16(bf16, says):
    from cellseg_plugins.engine.study import _machine

    m = {"cpu": "AMD EPYC", "threads_per_run": 2, "cpu_bf16": bf16, "gpu": None,
         "torch": "2.14.1", "jobs": 2}
    assert _machine(m) == f"AMD EPYC, 2 thread(s) a run{says}, 2 run(s) at a time; torch 2.14.1"
    assert _machine({**m, "gpu": "NVIDIA H200"}).startswith("NVIDIA H200, 2 run(s)")


COMPARED = TINY + """
[[row]]
name = "+ frem 3"
spec = "{net}+frem(B=3)"
base = "base"
paper = 71.0
scales = ["two"]

[[compare]]
row = "+ frem"
base = "+ frem 3"
note = "two channel counts"

[scale.one]
seeds = 1
"""


def test_compare_entries_report_the_paired_gain_between_two_rows(tmp_path):
    assert load_study(write(tmp_path, COMPARED), "one").comparisons == []  # no '+ frem 3' there
    study = load_study(write(tmp_path, COMPARED), "two")
    assert study.comparisons == [{"row": "+ frem", "base": "+ frem 3",
                                  "note": "two channel counts"}]
    # '+ frem' − '+ frem 3' over the (fold, seed) pairs both have: 0.01, 0.02, 0.03, as in
    # the hand-computed test above; the paper figures differ by 72.5 − 71.0
    fake_runs(tmp_path / "runs", study, {"base": [0.70] * 3, "+ frem": [0.71, 0.72, 0.73],
                                        "+ frem 3": [0.70, 0.70, 0.70]})
    result = report(tmp_path / "runs", tmp_path / "table")
    gain = result["comparisons"][0]["gain"]
    assert gain["n"] == 3 and math.isclose(gain["mean"], 0.02)
    assert math.isclose(gain["t_p"], 0.074180, rel_tol=1e-4)
    table = (tmp_path / "table" / "table.md").read_text()
    assert "| + frem | + frem 3 | 3 | +2.00 ± 1.00 | 0.074 | 0.250 | +1.50 | two channel " \
           "counts |" in table
    lines = (tmp_path / "table" / "comparisons.csv").read_text().splitlines()
    assert lines[0] == "row,base,pairs,gain_mean,gain_std,t_p,wilcoxon_p,paper_gain,note"
    assert lines[1].startswith("+ frem,+ frem 3,3,0.02") and lines[1].endswith(
        ",1.5,two channel counts")
    fake_runs(tmp_path / "old", load_study(write(tmp_path, TINY)),
              {"base": [0.7] * 3, "+ frem": [0.7] * 3})
    report(tmp_path / "old", tmp_path / "old_table")  # a study without [[compare]]
    assert "Other paired comparisons" not in (tmp_path / "old_table" / "table.md").read_text()
    assert not (tmp_path / "old_table" / "comparisons.csv").exists()


def test_study_run_then_report_end_to_end(tmp_path, capsys):
    path = write(tmp_path, TINY)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["study", "run", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    assert "+ frem fold 2 seed 0: training " in err and "+ frem fold 2 seed 0: epoch 1/" in err
    assert "+ frem fold 2 seed 0: test mIoU " in err
    assert sorted(p.name for p in (out / "frem").iterdir()) == [
        "fold0_seed0", "fold1_seed0", "fold2_seed0"]
    done = sorted(out.glob("*/fold*/test.json"), key=lambda p: p.stat().st_mtime_ns)
    assert [f"{p.parts[-3]}/{p.parts[-2]}" for p in done] == [  # fold by fold: paired early
        f"{row}/fold{f}_seed0" for f in range(3) for row in ("base", "frem")]
    table = (out / "table.md").read_text()
    stamp = (out / "base" / "fold0_seed0" / "test.json").stat().st_mtime
    with pytest.raises(SystemExit) as e:  # everything finished: rebuilt from stored runs only
        main(["study", "run", str(path), "--out", str(out)])
    assert e.value.code == 0 and (out / "table.md").read_text() == table
    assert (out / "base" / "fold0_seed0" / "test.json").stat().st_mtime == stamp
    record = (out / "study.json").read_text()
    capsys.readouterr()
    for old, new, setting in (("epochs = 1", "epochs = 2", "epochs = 2"),
                              ("batch_size = 32", "batch_size = 16", "batch_size = 16"),
                              ("width=4", "width=6", "spec = 'classic_unet(width=6)'")):
        changed = write(tmp_path, TINY.replace(old, new), "changed.toml")
        with pytest.raises(SystemExit) as e:  # kept runs of other settings: refused up front
            main(["study", "run", str(changed), "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: study setting {setting}: base fold 0 seed 0 in "), err
        assert "(finished) was trained with " in err and "or use another --out" in err
        assert (out / "study.json").read_text() == record  # nothing rewritten


def test_row_training_options_sit_between_study_and_scale():
    paper = load_study(ROOT / "studies" / "sstem4.toml", "paper")
    cpu = load_study(ROOT / "studies" / "sstem4.toml", "cpu")
    frem = {s.scale: s.row("U-Net + SE + FREM").train for s in (paper, cpu)}
    assert frem["paper"]["epochs"] == 2000 and frem["cpu"]["epochs"] == 60
    assert paper.config.epochs == 1500 and paper.row("U-Net").train == {}
    assert "U-Net + Feedback Attention (self)" not in {r.name for r in cpu.rows}
    assert paper.row("U-Net + SE + FREM").spec.startswith("classic_unet(width=32,se=True)")
    assert cpu.row("U-Net + SE + FREM").spec.startswith("classic_unet(width=8,se=True)")


def test_rows_runs_only_the_matching_rows_and_a_bad_pattern_is_one_line(tmp_path, capsys,
                                                                         monkeypatch):
    path = write(tmp_path, TINY)
    out = tmp_path / "out"
    argv = ["study", "run", str(path), "--out", str(out), "--rows", "+ FREM"]
    monkeypatch.setattr(sys, "argv", ["cellseg", *argv])
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 0 and "1 of 2 rows × 3 folds × 1 seed(s), 3 run(s) to do" in err, err
    assert not (out / "base").exists() and len(list((out / "frem").glob("*/test.json"))) == 3
    assert [r["name"] for r in json.loads((out / "study.json").read_text())["rows"]] == [
        "base", "+ frem"]  # the record keeps every row: the other rows can follow later
    ran = json.loads((out / "study.json").read_text())["invocations"]
    assert shlex.split(ran[0]["command"]) == ["cellseg", *argv]  # quoted: it runs again as is
    assert ran[0]["machine"]["jobs"] == 1 and ran[0]["machine"]["cpu_bf16"] in (
        "native", "emulated")
    rest = ["study", "run", str(path), "--out", str(out), "--threads", "1"]
    monkeypatch.setattr(sys, "argv", ["cellseg", *rest])
    for _ in range(2):  # the other row, then nothing left: the second invocation is not kept
        with pytest.raises(SystemExit) as e:
            main(rest)
        assert e.value.code == 0, capsys.readouterr().err
    capsys.readouterr()
    ran = json.loads((out / "study.json").read_text())["invocations"]
    assert [shlex.split(i["command"]) for i in ran] == [["cellseg", *argv], ["cellseg", *rest]]
    assert ran[1]["machine"]["threads_per_run"] == 1
    table = (out / "table.md").read_text()  # every invocation's command is in the table
    assert all(f"- command: `{i['command']}`" in table for i in ran)
    assert ", 1 thread(s) a run" in table
    with pytest.raises(SystemExit) as e:
        main(["study", "run", str(path), "--out", str(tmp_path / "no"), "--rows", "lfa*"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--rows 'lfa*': matches no row; the rows are 'base', '+ frem'" in err
    assert not (tmp_path / "no").exists()
    with pytest.raises(SystemExit) as e:
        main(["study", "run", str(write(tmp_path, TINY.replace("folds = 3", "folds = 2"))),
              "--out", str(tmp_path / "two")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--folds 2: need at least 3" in err and err.count("\n") == 1
    assert not (tmp_path / "two").exists()  # refused before anything is written


@pytest.mark.parametrize("folder", sorted(p.parent.name
                                           for p in (ROOT / "results").glob("*/study.json")))
def test_the_published_tables_rebuild_from_their_stored_runs(folder, tmp_path):
    """results/*/table.{md,csv} are what `cellseg study report` makes of the committed runs."""
    stored = ROOT / "results" / folder
    report(stored, tmp_path)
    for name in ("table.md", "table.csv", "comparisons.csv"):
        assert (tmp_path / name).exists() == (stored / name).exists(), name
        if (stored / name).exists():
            assert (tmp_path / name).read_text() == (stored / name).read_text(), name
