"""The evaluation's outputs: results.json, results.md (the paper's tables as markdown) and one PNG plot per table."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after matplotlib.use: the backend is chosen before pyplot loads

from labelfactory.jsonio import write_json_atomic

TITLES = {
    "I": "Table I: synthetic training set size vs mIoU",
    "II": "Table II: annotated images (interpreter training) vs mIoU",
    "III-C": "Section III-C: synthetic vs real vs hybrid training",
    "III": "Table III: segmenters compared, trained on synthetic pairs",
}


def write_report(results: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.md and table_<name>.png under `out`; returns {what: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    write_json_atomic(results, paths["json"], indent=2)
    paths["markdown"].write_text(markdown(results))
    for table, rows in results["tables"].items():
        paths[f"plot {table}"] = plot_table(table, rows, out / f"table_{table}.png")
    return paths


def fmt(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def markdown(results: dict) -> str:
    """Each table as markdown: one line per row, mIoU mean ± std over folds on test-G and test-R."""
    s = results["settings"]
    lines = [f"# Segmentation evaluation ({s['folds']} patient-wise folds, {s['size']}x{s['size']} slices)", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    if results.get("fid") is not None:
        lines += [f"FID of the synthetic images against the real slices: {results['fid']:.2f}", ""]
    for table, rows in results["tables"].items():
        lines += [
            f"## {TITLES.get(table, table)}",
            "",
            "| | network | training items per fold | mIoU on test-G | mIoU on test-R | mean Dice on test-R |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            n = sorted(set(r["train_items"]))
            lines.append(
                f"| {r['row']} | {r['network']} | {'-'.join(map(str, [n[0], n[-1]] if len(n) > 1 else n))} | "
                f"{fmt(r['test_G']['miou'], r['test_G']['miou_std'])} | "
                f"{fmt(r['test_R']['miou'], r['test_R']['miou_std'])} | "
                f"{fmt(r['test_R']['mean_dice'], r['test_R']['mean_dice_std'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_table(table: str, rows: list[dict], path: Path) -> Path:
    """mIoU ± std on test-G and test-R for every row: lines over the row's number for I and II, bars otherwise."""
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [r["row"] for r in rows]
    for k, (t, colour) in enumerate((("test_G", "tab:blue"), ("test_R", "tab:orange"))):
        mean = [r[t]["miou"] for r in rows]
        std = [r[t]["miou_std"] for r in rows]
        if table in ("I", "II"):
            x = [float(lab.rsplit("=", 1)[1]) for lab in labels]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, color=colour, label=t.replace("_", "-"))
        else:
            x = [i + (k - 0.5) * 0.38 for i in range(len(rows))]
            ax.bar(x, mean, width=0.38, yerr=std, capsize=3, color=colour, label=t.replace("_", "-"))
    if table in ("I", "II"):
        ax.set_xlabel("synthetic training pairs" if table == "I" else "annotated images")
    else:
        ax.set_xticks(range(len(rows)), labels, rotation=15, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mIoU (mean ± std over folds)")
    ax.set_title(TITLES.get(table, table), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
