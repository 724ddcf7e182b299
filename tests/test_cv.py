"""Cross-validation: the fold × seed grid, its summary, resume, jobs, failed runs."""

import pytest

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
    code, _, err = cli(capsys, *argv)  # everything finished: nothing is retrained
    assert code == 0 and (out / "fold0_seed0" / "last.pt").stat().st_mtime == stamp


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
