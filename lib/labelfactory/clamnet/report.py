"""The weak-segmentation experiment as a markdown report and a picture (matplotlib, Agg backend: no display)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from labelfactory.clamnet.data import WeakSlices

TRUTH_NOTE = "truth = PTV70 (tumour plus margin, a planning target, not a lesion outline)"


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(result: dict[str, Any], title: str, command: str) -> str:
    """Pooled table, ratios, per-patient Dice / AUROC of the baselines, mean ± std over patients."""
    methods = result["methods"]
    d = result["data"]
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Pixel {TRUTH_NOTE}. Train: {d['train']['patients']} patients ({d['train']['slices']} slices, "
        f"{d['train']['abnormal_slices']} abnormal); thresholds chosen on {d['threshold']['patients']} train "
        f"patients; scored on {d['evaluation']['patients']} validation patients ({d['evaluation']['slices']} slices, "
        f"{d['evaluation']['abnormal_slices']} abnormal). Budget: {result['budget']['steps']} steps of batch "
        f"{result['budget']['batch']} for every method.",
        "",
        "| method | Dice | IoU | pixel AUROC | slice acc. | slice sens. | slice spec. | threshold "
        "| patients' mean Dice ± sd | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in methods.items():
        p = r["pooled"]
        dices = [v["dice"] for v in r["per_patient"].values()]
        lines.append(
            f"| {name} | {_f(p['dice'])} | {_f(p['iou'])} | {_f(p['auroc'])} | {_f(p['slice_accuracy'])} | "
            f"{_f(p['slice_sensitivity'])} | {_f(p['slice_specificity'])} | {r['threshold']:.3g} | "
            f"{np.mean(dices):.3f} ± {np.std(dices):.3f} | {r['train_s']:.0f} |"
        )
    lines += ["", "Ratios: " + ", ".join(f"{k} {_f(v, 2)}" for k, v in result["ratios"].items()), ""]
    shown = [m for m in ("clamnet", "gradcam", "supervised") if m in methods]
    if shown:
        lines += [
            "Per validation patient (Dice / pixel AUROC):",
            "",
            "| patient | " + " | ".join(shown) + " |",
            "|---|" + "---|" * len(shown),
        ]
        for patient in methods[shown[0]]["per_patient"]:
            cells = [
                f"{_f(methods[m]['per_patient'][patient]['dice'])} / {_f(methods[m]['per_patient'][patient]['auroc'])}"
                for m in shown
            ]
            lines.append(f"| {patient} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def picture(
    evaluation: WeakSlices,
    indices: list[int],
    maps: dict[str, torch.Tensor],
    thresholds: dict[str, float],
    path: str | os.PathLike,
) -> None:
    """One row per slice: the CT crop with the truth outline, then each method's map over it (truth outline white,
    the thresholded map's outline cyan). maps[name]: (len(indices), S, S)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(maps)
    fig, axes = plt.subplots(
        len(indices), 1 + len(names), figsize=(2.2 * (1 + len(names)), 2.3 * len(indices)), squeeze=False
    )
    for row, i in enumerate(indices):
        ct, truth = evaluation.x[i, 0].numpy(), evaluation.truth[i, 0].numpy()
        for col in range(1 + len(names)):
            ax = axes[row, col]
            ax.imshow(ct, cmap="gray", vmin=-1, vmax=1)
            if col:
                name = names[col - 1]
                m = maps[name][row].numpy()
                ax.imshow(
                    np.ma.masked_less_equal(m, 0), cmap="inferno", alpha=0.6, vmin=0, vmax=max(float(m.max()), 1e-6)
                )
                if (m >= thresholds[name]).any():
                    ax.contour(m >= thresholds[name], levels=[0.5], colors="cyan", linewidths=0.8)
            if truth.any():
                ax.contour(truth, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("CT + PTV70" if col == 0 else names[col - 1], fontsize=9)
        axes[row, 0].set_ylabel(f"{evaluation.study[i]} z{int(evaluation.file_slice[i])}", fontsize=7)
    fig.suptitle(f"Validation slices; white: {TRUTH_NOTE}; cyan: map >= its train-chosen threshold", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def task_picture(tasks: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """One row per slice, tasks one under the other: the CT crop with the truth outline (white), then each method's
    map over it with its thresholded outline (cyan). Each task: title, x and truth (K, S, S), names (K row labels),
    maps {method: (K, S, S)}, thresholds {method: float}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for t in tasks for m in t["maps"]))
    rows = [(t, k) for t in tasks for k in range(len(t["x"]))]
    fig, axes = plt.subplots(
        len(rows), 1 + len(methods), figsize=(1.9 * (1 + len(methods)), 2.0 * len(rows)), squeeze=False
    )
    for r, (t, k) in enumerate(rows):
        truth = t["truth"][k].numpy()
        for col in range(1 + len(methods)):
            ax = axes[r, col]
            ax.imshow(t["x"][k].numpy(), cmap="gray", vmin=-1, vmax=1)
            name = methods[col - 1] if col else None
            if name in t["maps"]:
                m = t["maps"][name][k].numpy()
                ax.imshow(np.ma.masked_less_equal(m, 0), cmap="inferno", alpha=0.6, vmin=0, vmax=max(m.max(), 1e-6))
                if (m >= t["thresholds"][name]).any():
                    ax.contour(m >= t["thresholds"][name], levels=[0.5], colors="cyan", linewidths=0.7)
            if truth.any():
                ax.contour(truth, levels=[0.5], colors="white", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("CT + truth" if col == 0 else name, fontsize=8)
        axes[r, 0].set_ylabel(f"{t['title']}\n{t['names'][k]}", fontsize=7)
    fig.suptitle(
        "OpenKBP validation slices; white: truth; colour: map; cyan: map >= its train-chosen threshold", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
