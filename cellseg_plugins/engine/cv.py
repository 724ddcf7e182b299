"""The papers' protocol in one call: k folds × seeds, test scores, mean ± std."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import replace
from pathlib import Path

from .evaluation import evaluate_checkpoint
from .train import TrainConfig, Trainer


def run_dir(out: Path, fold: int, seed: int) -> Path:
    return out / f"fold{fold}_seed{seed}"


def run_cv(base: TrainConfig, folds: int, seeds: int, out: Path, on_run=None) -> dict:
    """Train and test every (fold, seed); finished runs (with test.json) are skipped.

    A run killed part-way resumes from its last.pt. Returns the summary (also written to
    out/summary.csv and out/summary.md).
    """
    results = []
    for fold in range(folds):
        for seed in range(seeds):
            rd = run_dir(out, fold, seed)
            done = rd / "test.json"
            if not done.exists():
                cfg = replace(base, fold=fold, folds=folds, seed=seed, out=str(rd))
                Trainer(cfg, resume=(rd / "last.pt").exists()).run()
                result = evaluate_checkpoint(rd / "best.pt", split="test", device=base.device)
                done.write_text(json.dumps(result))
            results.append({"fold": fold, "seed": seed, **json.loads(done.read_text())})
            if on_run:
                on_run(results[-1])
    summary = summarise(results)
    write_summary(summary, results, out)
    return summary


def summarise(results: list[dict]) -> dict:
    """Mean and (sample) std over runs of each class IoU and mIoU."""
    names = list(results[0]["iou"])
    rows = {name: [r["iou"][name] for r in results if r["iou"][name] is not None] for name in names}
    rows["mIoU"] = [r["miou"] for r in results]

    def stats(v):
        return {"mean": statistics.mean(v) if v else None,
                "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}

    return {"spec": results[0]["spec"], "runs": len(results),
            "classes": {k: stats(v) for k, v in rows.items()}}


def write_summary(summary: dict, results: list[dict], out: Path) -> None:
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "mean_iou", "std_iou", "runs"])
        for name, s in summary["classes"].items():
            w.writerow([name, s["mean"], s["std"], s["n"]])
    lines = [f"# {summary['spec']}: {summary['runs']} runs (folds × seeds), test IoU %", "",
             "| class | mean ± std |", "|---|---|"]
    for name, s in summary["classes"].items():
        value = "n/a" if s["mean"] is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
        lines.append(f"| {name} | {value} |")
    lines += ["", "| fold | seed | mIoU |", "|---|---|---|"]
    lines += [f"| {r['fold']} | {r['seed']} | {100 * r['miou']:.2f} |" for r in results]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
