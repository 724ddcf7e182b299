"""FOLDER/table.md from FOLDER/tta.jsonl: each run's test mIoU (%) without and with test-time
augmentation, the gains with cellseg's paired tests (as `cellseg study report` computes
them), per class.

    python results/tta_table.py results/tta-sstem4-cpu    (rewrites its table.md)
"""

import json
import statistics
import sys
from pathlib import Path

from cellseg_plugins.engine.study import paired_tests

KINDS = ("none", "flips", "d4")


def p_value(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def table(lines: list[str]) -> str:
    runs: dict[str, dict] = {}
    seconds: dict[str, list[float]] = {k: [] for k in KINDS}
    for line in lines:
        d = json.loads(line)
        runs.setdefault(Path(d["run"]).name, {})[d["tta"]] = d["result"]
        seconds[d["tta"]].append(d["seconds"])
    names = sorted(runs)
    miou = {k: [100 * runs[r][k]["miou"] for r in names] for k in KINDS}
    gains = {k: paired_tests(miou[k], miou["none"]) for k in KINDS[1:]}
    out = ["| run | no TTA | flips (4 passes) | d4 (8 passes) | flips gain | d4 gain |",
           "|---|---|---|---|---|---|"]
    for i, r in enumerate(names):
        out.append(f"| {r} | {miou['none'][i]:.2f} | {miou['flips'][i]:.2f} | "
                   f"{miou['d4'][i]:.2f} | {miou['flips'][i] - miou['none'][i]:+.2f} | "
                   f"{miou['d4'][i] - miou['none'][i]:+.2f} |")
    cells = [f"{statistics.mean(miou[k]):.2f} ± {statistics.stdev(miou[k]):.2f}" for k in KINDS]
    out.append(f"| mean ± std | {' | '.join(cells)} | "
               + " | ".join(f"**{g['mean']:+.2f} ± {g['std']:.2f}**" for g in gains.values())
               + " |")
    out += ["", "| | flips | d4 |", "|---|---|---|",
            "| paired t-test p | " + " | ".join(p_value(g["t_p"]) for g in gains.values()) + " |",
            "| Wilcoxon p | " + " | ".join(p_value(g["wilcoxon_p"]) for g in gains.values())
            + " |",
            "| eval time, median (no TTA: "
            f"{statistics.median(seconds['none']):.0f} s) | "
            + " | ".join(f"{statistics.median(seconds[k]):.0f} s" for k in KINDS[1:]) + " |",
            "", "| class IoU, mean over the runs | no TTA | flips | d4 | d4 gain |",
            "|---|---|---|---|---|"]
    for c in runs[names[0]]["none"]["iou"]:
        v = {k: [100 * runs[r][k]["iou"][c] for r in names] for k in KINDS}
        g = paired_tests(v["d4"], v["none"])
        out.append(f"| {c} | {statistics.mean(v['none']):.2f} | {statistics.mean(v['flips']):.2f}"
                   f" | {statistics.mean(v['d4']):.2f} | {g['mean']:+.2f} ± {g['std']:.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    (folder / "table.md").write_text(table((folder / "tta.jsonl").read_text().splitlines()))
