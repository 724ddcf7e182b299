"""Cross-validation: the fold × seed grid, its summary, resume, jobs, failed runs."""

import os
import signal
import subprocess
import sys
import time

import pytest

from cellseg_plugins.engine.checkpoint import hold_folder
from conftest import FAST, TINY, cli


def test_cv_grid_summary_and_resume(tmp_path, capsys):
    out = tmp_path / "cv"
    argv = ["cv", TINY, "--folds", "3", "--seeds", "2", "--epochs", "1", "--out", out, *FAST]
    code, stdout, err = cli(capsys, *argv)
    assert code == 0, err
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == [f"fold{f}_seed{s}" for f in range(3) for s in range(2)]
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0] == "class,mean_iou,std_iou,runs" and summary[-1].startswith("mIoU,")
    assert "| mIoU |" in (out / "summary.md").read_text()
    stamp = (out / "fold0_seed0" / "last.pt").stat().st_mtime
    assert "fold 1 seed 0: training 1 epoch(s) → " in err  # each run's progress lines
    assert "fold 1 seed 0: epoch 1/1, loss " in err and "fold 1 seed 0: test mIoU" in err
    code, _, err = cli(capsys, *argv)  # everything finished: nothing is retrained
    assert code == 0 and (out / "fold0_seed0" / "last.pt").stat().st_mtime == stamp
    assert "fold 0 seed 0:" not in err
    (out / "fold0_seed0" / "test.json").unlink()  # trained, not tested: only the test runs
    code, _, err = cli(capsys, *argv)
    assert code == 0 and "fold 0 seed 0: resuming after epoch 1 of 1" in err
    assert "epoch 1/1" not in err and "fold 1 seed 0" not in err
    (out / "fold0_seed0" / "test.json").unlink()
    other = hold_folder(out)  # another cv (or study) working in this folder
    code, _, err = cli(capsys, *argv)
    other.close()
    assert code == 2 and err.count("\n") == 1 and "resuming" not in err, err
    assert f"error: '{out}' is in use by another cellseg process (pid {os.getpid()})" in err
    assert not (out / "fold0_seed0" / "test.json").exists()  # nothing ran


def test_cv_tests_with_tta_and_retests_finished_runs_without_training_them(tmp_path, capsys):
    import json

    from cellseg_plugins.engine.evaluation import evaluate_checkpoint

    out = tmp_path / "cv"
    argv = ["cv", TINY, "--folds", "3", "--seeds", "1", "--epochs", "1", "--out", out, *FAST]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    plain = json.loads((out / "fold1_seed0" / "test.json").read_text())
    stamps = {p: p.stat().st_mtime for p in out.glob("*/*.pt")}
    code, stdout, err = cli(capsys, *argv, "--tta", "flips")
    assert code == 0, err
    assert "training" not in err and "resuming" not in err  # tested again, not trained
    assert {p: p.stat().st_mtime for p in out.glob("*/*.pt")} == stamps
    tested = json.loads((out / "fold1_seed0" / "test.json").read_text())
    assert tested["tta"] == "flips" and tested["miou"] != plain["miou"]
    best = evaluate_checkpoint(out / "fold1_seed0" / "best.pt", device="cpu", tta="flips")
    assert tested["miou"] == best["miou"]
    assert "test-time augmentation flips" in (out / "summary.md").read_text().splitlines()[0]
    assert "test-time augmentation flips" in " ".join(stdout.split())
    code, _, err = cli(capsys, *argv, "--tta", "flips")  # all tested so: nothing runs
    assert code == 0 and "fold 0 seed 0" not in err
    code, _, err = cli(capsys, *argv, "--tta", "x")
    assert code == 2 and err.count("\n") == 1 and "--tta 'x': expected none, flips, d4" in err


def test_progress_lines_come_after_the_first_epoch_and_then_at_most_every_interval(capsys):
    from types import SimpleNamespace

    from cellseg_plugins.engine.cv import progress_lines

    rows = [{"epoch": e, "train_loss": 0.5, "val_miou": 0.25, "seconds": 1.0} for e in (3, 4, 5)]
    for every, shown in ((3600, [3]), (0, [3, 4, 5])):
        trainer = SimpleNamespace(cfg=SimpleNamespace(epochs=5, out="o"), epoch=2, best=0.5,
                                  init_saw=[])
        on_epoch = progress_lines("row fold 1 seed 0", trainer, every=every)
        for row in rows:
            on_epoch(row)
        lines = capsys.readouterr().err.splitlines()
        assert lines[0] == "row fold 1 seed 0: resuming after epoch 2 of 5"
        assert [line.split(",")[0] for line in lines[1:]] == [
            f"row fold 1 seed 0: epoch {e}/5" for e in shown]
    assert lines[1] == ("row fold 1 seed 0: epoch 3/5, loss 0.5000, val mIoU 0.2500 "
                        "(best 0.5000), 1.0 s an epoch")


@pytest.mark.slow
def test_cv_jobs_2_gives_the_summary_of_jobs_1(tmp_path, capsys):
    argv = ["cv", TINY, "--folds", "3", "--seeds", "1", "--epochs", "1", "--threads", "1", *FAST]
    code, _, err = cli(capsys, *argv, "--jobs", "1", "--out", tmp_path / "one")
    assert code == 0, err
    code, _, err = cli(capsys, *argv, "--jobs", "2", "--out", tmp_path / "two")
    assert code == 0, err
    assert (tmp_path / "one" / "summary.csv").read_text() == (
        tmp_path / "two" / "summary.csv").read_text()


@pytest.mark.slow
def test_cv_reports_a_failed_run_and_finishes_the_others(tmp_path, capsys):
    bad = tmp_path / "bad" / "fold1_seed0"
    bad.mkdir(parents=True)
    (bad / "last.pt").write_bytes(b"not a checkpoint")  # fold 1 cannot resume
    code, _, err = cli(capsys, "cv", TINY, "--folds", "3", "--seeds", "1", "--epochs", "1",
                       "--jobs", "2", "--out", tmp_path / "bad", *FAST)
    last = err.strip().splitlines()[-1]  # after the finished runs' lines
    assert code == 2 and last.startswith("error: 1 of 3 runs failed: fold 1 seed 0:")
    assert (tmp_path / "bad" / "fold0_seed0" / "test.json").is_file()
    assert (tmp_path / "bad" / "fold2_seed0" / "test.json").is_file()


@pytest.mark.parametrize("command", ["cv", "tune"])
def test_bad_data_leaves_nothing_behind(tmp_path, capsys, command):
    extra = ["--search", "frem.B=int:1:4"] if command == "tune" else []
    code, _, err = cli(capsys, command, TINY + "+frem(B=2)", *extra, "--data", tmp_path / "nope",
                       "--out", tmp_path / "out", *FAST)
    assert code == 2 and "not 'synthetic', 'sstem' or an existing folder" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, fragment", [
    ("--folds", "2", "--folds 2: need at least 3 (test, validation and training blocks)"),
    ("--folds", "500", "source images make at most"),
    ("--seeds", "0", "--seeds 0: must be ≥ 1")])
def test_a_bad_fold_or_seed_count_is_one_line_before_any_run(tmp_path, capsys, option, value,
                                                             fragment):
    code, _, err = cli(capsys, "cv", TINY, option, value, "--out", tmp_path / "out", *FAST)
    assert code == 2 and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("crop, fragment", [
    ("7", "--crop 7: this model takes sides any size ≥ 16 (e.g. 16)"),
    ("512", "--crop 512: image synthetic00 is 256×256; pass a --crop of at most 256, the "
            "smallest side of these images")])
def test_a_crop_every_run_would_refuse_is_one_line_before_any_run(tmp_path, capsys, crop,
                                                                  fragment):
    code, _, err = cli(capsys, "cv", TINY, *FAST, "--crop", crop, "--folds", "3",
                       "--out", tmp_path / "out")
    assert code == 2 and err == f"error: {fragment}\n", err  # not once per fold and seed
    assert not (tmp_path / "out").exists()


def test_kept_runs_of_other_settings_are_refused_before_any_run(tmp_path, capsys):
    import json
    from dataclasses import asdict

    import torch

    from cellseg_plugins.engine.checkpoint import FORMAT
    from cellseg_plugins.engine.cv import check_kept_runs
    from conftest import tiny_config

    out = tmp_path / "cv"
    kept = tiny_config(out / "fold0_seed0", epochs=1, folds=3, fold=0, seed=0)
    kept.check()
    kept.out = str(kept.out)
    (out / "fold0_seed0").mkdir(parents=True)
    (out / "fold0_seed0" / "config.json").write_text(json.dumps(asdict(kept)))
    (out / "fold0_seed0" / "test.json").write_text("{}")
    argv = ["cv", TINY, "--folds", "3", "--seeds", "1", "--out", out, *FAST]
    for option, value, was in (("--lr", "0.02", "0.001"), ("--epochs", "2", "1"),
                               ("--folds", "4", "3")):
        code, _, err = cli(capsys, *argv, "--epochs", "1", option, value)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {option} {value}: fold 0 seed 0 in "), err
        assert f"(finished) was trained with {was}; give that value" in err, err
        assert sorted(p.name for p in out.iterdir()) == ["fold0_seed0"]  # nothing ran
    unfinished = tmp_path / "u" / "fold0_seed0"
    unfinished.mkdir(parents=True)
    torch.save({"format": FORMAT, "config": {**asdict(kept), "out": str(unfinished)}},
               unfinished / "last.pt")
    longer = tiny_config(unfinished, epochs=5, folds=3, fold=0, seed=0)
    check_kept_runs([(longer, "run")])  # an unfinished run may train longer, as --resume does
    for other in ({"lr": 0.02}, {"spec": "unet(encoder='plain4')+frem(B=2)"}):
        cfg = tiny_config(unfinished, epochs=1, **{"folds": 3, "fold": 0, **other})
        with pytest.raises(Exception, match=r"run in .* \(unfinished\) was trained with "):
            check_kept_runs([(cfg, "run")])


def _group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (from /proc)."""
    from pathlib import Path

    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
@pytest.mark.parametrize("how", ["SIGKILL to cv", "Ctrl-C"])
def test_the_workers_of_cv_jobs_stop_with_it(tmp_path, how):
    """SIGKILL of `cellseg cv --jobs 2` (it cannot pass the signal on): its workers stop too
    instead of training on, unseen, into the folder a restarted cv would resume. Ctrl-C (SIGINT
    to every process of the command): one line, no worker's traceback, exit code 130."""
    out = tmp_path / "cv"
    process = subprocess.Popen(
        [sys.executable, "-m", "cellseg_plugins.cli.main", "cv", TINY, "--data", "synthetic",
         "--folds", "3", "--seeds", "1", "--epochs", "200", "--jobs", "2", "--threads", "1",
         "--out", out, *FAST], start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    deadline = time.time() + 120
    while len(list(out.glob("fold*_seed0/metrics.csv"))) < 2 and time.time() < deadline:
        time.sleep(0.5)  # both workers are training
    assert len(list(out.glob("fold*_seed0/metrics.csv"))) == 2
    assert len(_group(process.pid)) >= 3  # cv, its two workers (and the resource tracker)
    if how == "Ctrl-C":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.kill()
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # orphaned workers still hold its stderr
        err = None
    deadline = time.time() + 15
    while _group(process.pid) and time.time() < deadline:
        time.sleep(0.2)
    left = _group(process.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes still running after cv was stopped: {left}"
    if how == "Ctrl-C":
        assert process.returncode == 130 and "Traceback" not in err, err
        assert err.endswith("error: interrupted; finished runs are kept: the same command "
                            "resumes the others\n"), err
