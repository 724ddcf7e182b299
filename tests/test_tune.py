import json

import pytest

import cellseg_plugins as cs
from conftest import cli

SPEC = "unet(encoder='plain4')+frem"
FAST = ["--epochs", "1", "--crop", "64", "--batch-size", "32", "--device", "cpu"]
SEARCH = ["--search", "frem.B=int:1:16", "--search", "frem.X=float:1:1000:log"]


def test_study_runs_resumes_and_prints_a_buildable_spec(tmp_path, capsys):
    out = tmp_path / "tune"
    code, stdout, err = cli(capsys, "tune", SPEC, *SEARCH, "--trials", "2", "--out", out, "--json", *FAST)
    assert code == 0, err
    first = json.loads(stdout)
    assert first["n_trials"] == 2 and 0 <= first["best_value"] <= 1
    assert set(first["best_params"]) == {"frem.B", "frem.X"}
    model = cs.create_model(first["best_spec"])
    assert model.cellseg_spec == first["best_spec"]
    assert (out / "study.db").is_file() and (out / "search.png").is_file()
    code, stdout, err = cli(capsys, "tune", SPEC, *SEARCH, "--trials", "3", "--out", out, "--json", *FAST)
    assert code == 0, err
    assert json.loads(stdout)["n_trials"] == 3  # exactly one more trial
    assert sorted(p.name for p in out.glob("trial*")) == ["trial0000", "trial0001", "trial0002"]
    db = (out / "study.db").read_bytes()
    search = ["--search", "frem.B=int:1:8", SEARCH[2], SEARCH[3]]
    for argv, fragment in (  # another setting with the same --out: refused, nothing touched
            ([SPEC, *SEARCH, *FAST, "--lr", "0.1"], "--lr 0.1: the tune study in "
             f"{str(out)!r} ran its trials with 0.001; give that value to continue it"),
            ([SPEC, *SEARCH, *FAST, "--epochs", "2"], "--epochs 2: the tune study in "),
            ([SPEC + "(B=2)", *SEARCH, *FAST], "SPEC \"unet(encoder='plain4')+frem(B=2)\": "),
            ([SPEC, *search, *FAST], "--search frem.B=int:1:8 frem.X=float:1:1000:log: the "
             "tune study in ")):
        code, _, err = cli(capsys, "tune", *argv, "--trials", "4", "--out", out)
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert (out / "study.db").read_bytes() == db and len(list(out.glob("trial*"))) == 3


@pytest.mark.slow
def test_jobs_run_trials_at_once_in_processes_on_one_study(tmp_path, capfd):
    from cellseg_plugins.cli.main import main

    import optuna

    out, storage = tmp_path / "tune", f"sqlite:///{tmp_path / 'shared.db'}"  # any storage URL
    with pytest.raises(SystemExit) as e:
        main(["tune", SPEC, *SEARCH, "--trials", "3", "--jobs", "2", "--threads", "1",
              "--storage", storage, "--out", str(out), "--json", *FAST])
    stdout, err = capfd.readouterr()
    assert e.value.code == 0, err
    assert json.loads(stdout)["n_trials"] == 3  # the jobs share the total: 2 + 1 trials
    assert sorted(p.name for p in out.glob("trial*")) == ["trial0000", "trial0001", "trial0002"]
    assert sorted(int(line.split()[1][:-1]) for line in err.splitlines()
                  if line.startswith("trial ")) == [0, 1, 2]  # each job reports its trials
    (summary,) = optuna.study.get_all_study_summaries(storage)  # one study, in the storage
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # seeded apart
    first, second = sorted(trials, key=lambda t: t.datetime_start)[:2]
    assert second.datetime_start < first.datetime_complete  # two at once


@pytest.mark.parametrize("search, fragment", [
    ("lfa.m=int:3:9", "'lfa' is not in the spec"),
    ("frem.Q=int:1:4", "'frem' has no parameter 'Q' (valid: B, X, per, fixed, at_test, seed)"),
    ("frem.B=int:9:2", "LOW 9 is greater than HIGH 2"),
    ("frem.X=float:0:10:log", "a log scale needs LOW > 0"),
    ("frem.B=gauss:1:2", "must be int:LOW:HIGH[:log]"),
    ("nope.B=int:1:2", "unknown plugin or arch 'nope'"),
    ("train.momentum=float:0:1", "unknown training option 'momentum'"),
    ("frem.B", "expected PARAM=SPACE"),
    ("frem.B=int:1:4 --crop 7", "--crop 7: this model takes sides"),  # before any trial
    # values the parameter or training option refuses, found before any trial fails on them
    ("frem.B=int:0:4", "B=0: 0 is out of range (0, inf]"),
    ("frem.fixed=choice:True,1", "fixed=1: expected bool"),
    ("frem.per=int:0:1", "per takes one of 'epoch', 'batch': search it as choice"),
    ("train.lr=float:0:1e-2", "lr=0.0: must be > 0"),
    ("train.batch_size=int:0:4", "batch_size=0: must be ≥ 1"),
    ("train.optimizer=choice:adam,zzz", "optimizer='zzz': expected one of adam, sgd"),
])
def test_bad_search_spaces_fail_before_training(tmp_path, capsys, search, fragment):
    search, *more = search.split()
    code, _, err = cli(capsys, "tune", SPEC, "--search", search, "--trials", "1",
                       "--out", tmp_path / "t", *FAST, *more)
    assert code == 2 and fragment in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_trials_the_model_refuses_say_why_and_none_finished_is_an_error(tmp_path, capsys):
    """Values only the model can judge (an encoder's name) fail their trial with the
    model's one-line reason, no traceback; a study where no trial finished exits 2."""
    code, _, err = cli(capsys, "tune", SPEC, "--search", "unet.encoder=choice:nope1,nope2",
                       "--trials", "2", "--out", tmp_path / "t", *FAST)
    assert code == 2 and "Traceback" not in err, err
    text = " ".join(err.split())  # Rich wraps long lines
    for name in ("nope1", "nope2"):
        assert f"fail {{'unet.encoder': '{name}'}}: bad model spec (term 'unet'): unknown " \
               f"encoder '{name}'" in text, err
    assert err.splitlines()[-1].startswith("error: no trial finished (2 failed); the last: "
                                           "bad model spec (term 'unet'): unknown encoder"), err
    code, _, err = cli(capsys, "tune", SPEC, "--search", "train.crop=choice:8", "--trials", "1",
                       "--out", tmp_path / "c", *FAST)  # a sampled crop the model refuses
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == ("error: no trial finished (1 failed); the last: crop=8: "
                                    "this model takes sides any size ≥ 16 (e.g. 16)"), err


def test_bad_storage_url_is_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "tune", SPEC, *SEARCH, "--trials", "1", "--storage", "nosuchdb://x",
                       "--out", tmp_path / "t", *FAST)
    assert code == 2 and "--storage 'nosuchdb://x'" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_a_bad_fold_is_one_line_before_any_trial(tmp_path, capsys):
    code, _, err = cli(capsys, "tune", SPEC, *SEARCH, "--trials", "1", "--fold", "9",
                       "--out", tmp_path / "t", *FAST)
    assert code == 2 and err.strip() == "error: --fold 9: expected 0 … 4"
    assert not (tmp_path / "t").exists()  # no study.db of failed trials


def test_the_best_trial_is_printed_as_a_train_command_that_runs(tmp_path, capsys):
    """The command carries the trial's spec, its train.* values and the options tune was
    given; run as printed, it trains with them."""
    import shlex

    out = tmp_path / "tune"
    code, stdout, err = cli(capsys, "tune", SPEC, "--search", "frem.B=int:1:16", "--search",
                            "train.lr=float:1e-4:1e-2:log", "--trials", "1", "--no-augment",
                            "--out", out, *FAST)
    assert code == 0, err
    command = stdout.strip().splitlines()[-1]
    words = shlex.split(command)
    assert words[:2] == ["cellseg", "train"] and "(B=" in words[2] and "--no-augment" in words
    lr = float(words[words.index("--lr") + 1])
    assert 1e-4 <= lr <= 1e-2 and words[words.index("--crop") + 1] == "64"
    code, _, err = cli(capsys, *words[1:], "--out", tmp_path / "again")
    assert code == 0, err
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["lr"] == lr and config["spec"] == words[2] and config["augment"] is False
