"""The DatasetGAN label-efficiency protocol on OpenKBP head-and-neck CT (issue 28): docs/RESULTS.md section 0.

    label_efficiency.py [run] --openkbp DIR --work DIR [--rows ...] [--freeze] [--publish]

A dev split of train patients takes every choice, `--freeze` fixes them in benchmarks/label_efficiency/protocol.json,
and only then are the validation patients scored, once, per patient (see `Run` and that section). Each stage writes
`WORK/<stage>/` and a `done.json` marker (a finished stage is skipped on rerun):
  generator   the generator file (gan.sh or --generator) and its FID against the dev patients' slices
  annotator   the stand-in annotator: the library trainer on every pool slice, scored on dev
  labels      per synthetic set asked: `annotations` generated images labelled by the annotator, (a) random seeds,
              (b) picked by `generated_uncertain` through a real server loop
  synthetic   per set: an interpreter trained on its labels, then the synthetic pairs (the most uncertain dropped)
  choose      every choice on the dev split; segmenters, test, report: the final rows, scored once, the table

`--reduced` shrinks every size for the test suite (tests/test_label_efficiency.py). The earlier (issue 12) run of
docs/RESULTS.md section 0a was made by this file as it was at commit 8b17878.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from labelfactory.checkpoints import copy_model
from labelfactory.datasets import openkbp
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.segmentation.data import RealSlices, UnlabelledSlices
from labelfactory.segmentation.train import SegmentationConfig

REPO = Path(__file__).resolve().parents[1]
LABEL_NAMES: dict[str, int] = {"background": 0, **{name: v for v, name in openkbp.ORGANS.items()}}


# ---------------------------------------------------------------------------------------------- stage bookkeeping


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_stage(out: Path, name: str, fn: Callable[[Path], dict]) -> dict:
    """Run `fn(<out>/<name>)` unless `<out>/<name>/done.json` exists; the marker holds fn's result and CPU time."""
    folder = out / name
    done = read_json(folder / "done.json")
    if done is not None:
        log(f"stage {name}: done before ({done['cpu_hours']:.2f} CPU-h), skipped")
        return done
    folder.mkdir(parents=True, exist_ok=True)
    log(f"stage {name}: start")
    c0, t0, recorded0 = cpu_seconds(), time.time(), sum(_RECORDED.values())
    result = fn(folder)
    add_cpu(folder, cpu_seconds() - c0 - (sum(_RECORDED.values()) - recorded0))  # what fn did not record anywhere
    cpu_hours = read_json(folder / "cpu.json")["cpu_seconds"] / 3600  # every run's, interrupted ones included
    if result.get("pending"):  # a part asked for (--rows) is done: the stage is not
        log(f"stage {name}: still to do: {', '.join(result['pending'])} (not asked for now, or inputs missing)")
        return result
    done = {
        "stage": name,
        "result": result,
        "cpu_hours": cpu_hours,
        "wall_hours": (time.time() - t0) / 3600,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(done, folder / "done.json")
    log(f"stage {name}: done in {done['wall_hours'] * 60:.1f} min ({done['cpu_hours']:.2f} CPU-h)")
    return done


_RECORDED: dict[Path, float] = {}  # CPU seconds this process has added to each stage's record


def add_cpu(folder: Path, seconds: float) -> None:
    """Add CPU seconds to `folder`'s stage record (it survives interrupted runs). Locked: two `--rows` runs may
    train one stage's rows at once."""
    with open(folder / "cpu.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rec = read_json(folder / "cpu.json", {"cpu_seconds": 0.0})
        write_json_atomic({"cpu_seconds": rec["cpu_seconds"] + seconds}, folder / "cpu.json")
    _RECORDED[folder] = _RECORDED.get(folder, 0.0) + seconds


# What --keep carries from one machine to the next (a committed folder): each stage's records and the small files
# the later stages read (model files with their .sha256). Synthetic pairs are remade from the kept interpreter (a pair
# depends only on its seed and the models); a final segmenter's weights are not kept, its test scores are (it is
# scored as soon as it is trained); the fine-tune hybrids' shared pre-training is (every draw starts from it).
KEPT = {
    "generator": ("done.json", "cpu.json", "stylegan2.pt", "stylegan2.pt.sha256"),
    "annotator": ("done.json", "cpu.json", "segmentation.pt", "segmentation.pt.sha256"),
    "labels": ("done.json", "cpu.json", "random/*.nii.gz", "random/images/*.nii.gz", "uncertainty/datastore/**/*"),
    "synthetic": ("cpu.json", "*/datasetgan.pt", "*/datasetgan.pt.sha256"),
    "choose": ("done.json", "cpu.json", "*/dev.json", "*/data.json"),
    "segmenters": ("cpu.json", "pretrain.*/segmentation.pt", "pretrain.*/segmentation.pt.sha256"),
    "test": ("cpu.json", "*.draw*.seed*.json"),
}


def keep_files(work: Path, keep: Path, stage: str) -> int:
    """Copy `stage`'s kept files from the work folder into `keep` where missing or different; returns how many."""
    copied = 0
    for pattern in KEPT.get(stage, ()):
        for src in (work / stage).glob(pattern):
            dst = keep / src.relative_to(work)
            if src.is_file() and not (dst.is_file() and dst.read_bytes() == src.read_bytes()):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
                os.replace(dst.with_name(dst.name + ".tmp"), dst)
                copied += 1
    return copied


def restore_kept(keep: Path, work: Path) -> int:
    """Copy every kept file into the work folder where it is missing (a fresh machine resumes where the last
    left off); returns how many."""
    restored = 0
    for src in sorted(p for p in keep.rglob("*") if p.is_file() and p.suffix != ".tmp"):
        dst = work / src.relative_to(keep)
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            restored += 1
    return restored


# ---------------------------------------------------------------------------------------------- figures


def organ_colors() -> dict[int, tuple[float, float, float]]:
    """value -> matplotlib RGB of each organ (tab10: the label map's anatomical colours repeat for the parotids)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {v: cmap(i)[:3] for i, v in enumerate(openkbp.ORGANS)}


def pairs_figure(path: Path, sets: dict[str, Path], n: int = 6) -> Path:
    """For each synthetic set (name -> pairs folder): the first `n` kept pairs as image / mask / uncertainty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labelfactory.io import read_image

    colors = organ_colors()
    fig, axes = plt.subplots(3 * len(sets), n, figsize=(1.7 * n, 1.8 * 3 * len(sets)), squeeze=False)
    for k, (name, folder) in enumerate(sets.items()):
        files = sorted((folder / "images").glob("seed*.nii.gz"))[:n]
        for c, f in enumerate(files):
            img = openkbp.WINDOW.to_unit(read_image(f).array)
            mask = read_image(folder / "labels" / f.name).array
            unc = read_image(folder / "uncertainty" / f.name).array
            overlay = np.repeat(((img + 1) / 2)[..., None], 3, axis=2)
            for v, rgb in colors.items():
                overlay[mask == v] = 0.45 * overlay[mask == v] + 0.55 * np.asarray(rgb)
            for r, (pic, kw) in enumerate(
                ((img, {"cmap": "gray", "vmin": -1, "vmax": 1}), (overlay, {}), (unc, {"cmap": "magma"}))
            ):
                ax = axes[3 * k + r, c]
                ax.imshow(pic, **kw)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(f"{name}\n{('image', 'mask', 'uncertainty')[r]}", fontsize=7)
    fig.suptitle("synthetic pairs: generated image, interpreter mask, ensemble uncertainty (JS divergence)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- labels, synthetic sets

RANDOM_SEED0 = 500_000  # the randomly picked images to annotate (the server's strategy draws from 0, 1, ...)
SYNTH_SEED0 = 1_000_000  # synthetic pairs


@dataclass(frozen=True)
class FactorySizes:
    """The labels and synthetic stages' sizes (the issue-12 run's; not in the frozen protocol's `RunSizes`);
    `reduced()` is the test suite's."""

    retrain_every: int = 5  # loop labels between interpreter retrainings
    candidates: int = 16  # K candidates the strategy scores per next sample
    explore: int = 2  # every 2nd pick random: pure uncertainty (0) missed the larynx (benchmarks/selection_coverage.py)
    members: int = 10  # interpreter ensemble size
    interpreter_epochs: int = 100  # max epochs, early stopping: 4 gave 0.50 Dice, 100 gave 0.76 (interpreter_budget)
    pairs: int = 1500  # synthetic pairs kept per label set, after dropping
    drop_fraction: float = 0.1  # the most uncertain fraction dropped

    @classmethod
    def reduced(cls) -> FactorySizes:
        return cls(retrain_every=2, candidates=2, members=2, interpreter_epochs=1, pairs=6)


def datastore_records(folder: Path) -> list[tuple[str, dict, str]]:
    """(image id, latent record, label path) of the labelled generated images of a datastore folder."""
    from labelfactory.datasetgan.records import records_from_datastore
    from labelfactory.tasks.datastore import LabelFactoryDatastore

    datastore = LabelFactoryDatastore(str(folder), extensions=["*.nii.gz"], auto_reload=False, label_names=LABEL_NAMES)
    return records_from_datastore(datastore)


# ---------------------------------------------------------------------------------------------- processes

CLI = [sys.executable, "-m", "labelfactory.cli"]


def run_logged(cmd: list[str], log_file: Path) -> None:
    """Run a command to completion, its output appended to `log_file`; SystemExit with the log's tail on failure."""
    log(" ".join(cmd))
    with open(log_file, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log_file.read_text()[-2000:]
        raise SystemExit(f"{cmd[3]} failed ({rc}); {log_file}:\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    import requests

    t0 = time.time()
    while time.time() - t0 < timeout:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}) before answering; see its server.log")
        try:
            if requests.get(f"{url}/info/", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise SystemExit(f"the server at {url} did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """End the server we started (its whole session: uvicorn and any training subprocess)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ---------------------------------------------------------------------------------------------- rows, dev split
# `label_efficiency.py run --openkbp DIR --work DIR` rebuilds section 0: stages in order, each skipped when its
# `done.json` exists. Every choice is made on a fixed dev split of train patients (`choose`); `--freeze` writes the
# choices into the committed protocol.json; only then are the final segmenters trained and the 33 validation patients
# scored, once each (`test`). `report` writes the table from the JSON; `--publish` puts it into docs/RESULTS.md.

PROTOCOL_DIR = REPO / "benchmarks" / "label_efficiency"
RUN_STAGES = ("generator", "annotator", "labels", "synthetic", "choose", "segmenters", "test", "report")
DEV_SEED, DEV_FRACTION = 28, 26 / 170  # the dev split: ~26 of OpenKBP's 170 train patients, by patient
TABLE_MARKERS = ("<!-- label-efficiency-table:start -->", "<!-- label-efficiency-table:end -->")


@dataclass(frozen=True)
class Row:
    """One table row: where its training pairs come from and whether it is augmented.

    real: real labelled train slices per draw (0 none, -1 every slice of the pool); synthetic: the synthetic set
    ("random" or "uncertainty") or ""; mix: "" (the pairs concatenated), "share" (every batch `real_share` real) or
    "finetune" (trained on synthetic, then fine-tuned on the real slices); relabel: the real slices' masks are the
    annotator's prediction (complete labels) instead of the partial contours; semi: a Mean Teacher that also learns
    from every pool slice unlabelled (the slices the GAN learnt from, less the dev patients).
    """

    name: str
    real: int = 0
    synthetic: str = ""
    mix: str = ""
    relabel: bool = False
    augment: bool = False
    semi: bool = False

    @property
    def has_draw(self) -> bool:
        """Rows whose real slices are a random draw get `draws` draws; the others one (draw 0)."""
        return self.real > 0


def protocol_rows(n: int = 30) -> tuple[Row, ...]:
    """Every row, plain and augmented: real-n, real-2n (the hybrid's annotation cost), real-all, real-n relabelled by
    the annotator, synthetic random-n and uncertainty-n, and the two hybrids on both synthetic sets."""
    base = [
        Row(f"real-{n}", real=n),
        Row(f"real-{2 * n}", real=2 * n),
        Row("real-all", real=-1),
        Row(f"real-{n}-relabelled", real=n, relabel=True),
        Row(f"real-{n}-mean-teacher", real=n, semi=True),
        Row(f"synthetic-random-{n}", synthetic="random"),
        Row(f"synthetic-uncertainty-{n}", synthetic="uncertainty"),
        *(Row(f"hybrid-{mix}-{s}", real=n, synthetic=s, mix=mix) for mix in ("share", "finetune") for s in SETS),
    ]
    return tuple(r2 for r in base for r2 in (r, Row(**{**asdict(r), "name": f"{r.name}-aug", "augment": True})))


SETS = ("random", "uncertainty")


def primary_rows(n: int = 30) -> tuple[str, ...]:
    """The rows the protocol runs by default, sized for a 2-core CPU (about 12 CPU-h; every other row by --rows):
    the reference (augmented real-n) and its plain twin, the ceiling (augmented real-all), and the factory three
    ways on the random set (synthetic alone, balanced batches, pre-train then fine-tune)."""
    return (
        f"real-{n}-aug",
        f"real-{n}",
        "real-all-aug",
        f"synthetic-random-{n}-aug",
        "hybrid-share-random-aug",
        "hybrid-finetune-random-aug",
    )


# ---------------------------------------------------------------------------------------------- dev split, protocol


def make_dev_split(train_patients: list[str], seed: int = DEV_SEED, fraction: float = DEV_FRACTION) -> dict:
    """A dev split of train patients: round(fraction * n) (>= 1) names drawn by `seed` from the sorted names."""
    names = sorted(train_patients)
    n = max(1, round(fraction * len(names)))
    dev = np.random.default_rng(seed).choice(names, n, replace=False).tolist()
    return {
        "split": "train",
        "patients": len(names),
        "seed": seed,
        "n": n,
        "method": "numpy default_rng(seed).choice(sorted train patient names, n, replace=False)",
        "dev": sorted(dev),
    }


def dev_split(path: Path, train_patients: list[str]) -> list[str]:
    """The recorded dev split at `path` (written from `make_dev_split` when absent); refused when it names
    patients outside `train_patients` (a split of another data folder)."""
    split = read_json(path)
    if split is None:
        split = make_dev_split(train_patients)
        write_json_atomic(split, path)
    unknown = sorted(set(split["dev"]) - set(train_patients))
    if unknown:
        raise SystemExit(f"dev split {path} names patients not in this data's train split: {', '.join(unknown[:5])}")
    return split["dev"]


def read_protocol(path: Path) -> dict:
    """The protocol file: {"frozen": bool, "choices": {...}, ...}; an absent file is an unfrozen protocol."""
    return read_json(path, {"frozen": False, "choices": {}}) or {"frozen": False, "choices": {}}


def require_frozen(protocol: dict, path: Path, stage: str) -> dict:
    """The frozen choices, or SystemExit: nothing is trained for, or scored on, the test patients before."""
    if not protocol.get("frozen"):
        raise SystemExit(
            f"stage {stage} refused: the protocol {path} is not frozen. Its choices come from the dev split "
            "(stage choose); rerun with --freeze to write them there (and commit it), then run again."
        )
    return protocol["choices"]


def freeze(path: Path, chosen: dict, dev: list[str], sizes: dict, rows: list[str]) -> dict:
    """Write the dev split's choices, the sizes and the rows into `path` as frozen (refused if a different frozen
    protocol is there)."""
    old = read_protocol(path)
    if old.get("frozen") and (old["choices"], old.get("sizes", sizes)) != (chosen, sizes):
        raise SystemExit(f"{path} is frozen with other choices or sizes: {old['choices']}; delete it to re-choose")
    if old.get("frozen"):
        return old
    protocol = {
        "frozen": True,
        "choices": chosen,
        "sizes": sizes,
        "rows": rows,
        "chosen_on": f"dev split: {len(dev)} train patients ({', '.join(dev)})",
        "frozen_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
    }
    write_json_atomic(protocol, path)
    return protocol


def git_commit() -> str:
    """`git rev-parse HEAD` of the repository (with "+dirty" when the tree has changes), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.strip() else "")


# ---------------------------------------------------------------------------------------------- training, scoring


def row_config(network: str, size: int, steps: int, batch_size: int, seed: int, **recipe) -> SegmentationConfig:
    """The library config of one protocol segmenter: body crops in the OpenKBP window, one state save per 100
    steps; `recipe` (augment, real_share, init_from) as chosen on the dev split."""
    return SegmentationConfig(
        network=network,
        size=size,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        label_names=dict(LABEL_NAMES),
        val_interval=min(steps, 100),
        slicing="body-crop",
        window=(openkbp.WINDOW.level, openkbp.WINDOW.width),
        **recipe,
    )


def contoured_row(organs_present: tuple[int, ...]) -> torch.Tensor:
    """(n_classes,) bool: background and the organs contoured in that patient."""
    row = torch.zeros(len(LABEL_NAMES), dtype=torch.bool)
    row[[0, *organs_present]] = True
    return row


def patient_scores(pred: np.ndarray, truth: np.ndarray, case: openkbp.Case) -> dict:
    """Per-patient endpoint (`evaluation.volume`): {"dice": mean Dice over the organs contoured in this patient
    (primary), "hd95": mean HD95 (mm) over them, "organs": {name: {"dice", "hd95"}}}."""
    from labelfactory.evaluation.volume import patient_scores as scores

    spacing = tuple(float(x) for x in case.spacing_mm[::-1])  # arrays are (z, y, x)
    s = scores(pred, truth, contoured_row(case.organs_present), spacing, dict(openkbp.ORGANS))
    return {"dice": s["mean_dice"], "hd95": s["mean_hd95"], "organs": s["organs"]}


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class RunSizes:
    """The protocol's sizes; `reduced()` is the test suite's."""

    size: int = 64
    annotations: int = 30  # real slices per draw, labelled generated images per synthetic set
    draws: int = 5  # label draws of every row that has one
    seeds: int = 1  # segmenter seeds per draw (the draws vary the seed's data already)
    undrawn_seeds: int = 3  # segmenter seeds of each row without a draw (real-all, the synthetic rows)
    annotator_steps: int = 3000
    steps_grid: str = "500,1500"  # the dev split picks the step budget among these
    share_grid: str = "0.25,0.5"  # the dev split picks the hybrid's real share among these
    consistency_grid: str = "0.1,1.0"  # the dev split picks the Mean Teacher's consistency weight among these
    batch_size: int = 16
    fid_images: int = 2000
    psi: float = 0.7  # the synthesis psi (latent_record.TRUNCATION_PSI), FID'd beside psi 1
    network: str = "unetpp"
    test_patients: int = 0  # validation patients scored (0: all 33)

    @classmethod
    def reduced(cls) -> RunSizes:
        return cls(
            size=32,
            test_patients=1,
            annotations=3,
            draws=2,
            seeds=1,
            undrawn_seeds=1,
            annotator_steps=2,
            steps_grid="1,2",
            share_grid="0.5",
            consistency_grid="1.0",
            batch_size=2,
            fid_images=8,
        )


class Run:
    """The protocol's stages over one OpenKBP folder and one work folder."""

    def __init__(self, args: argparse.Namespace):
        self.data, self.work, self.args = args.openkbp, args.work, args
        self.sizes = RunSizes.reduced() if args.reduced else RunSizes()
        self.factory = FactorySizes.reduced() if args.reduced else FactorySizes()
        for f in fields(RunSizes):
            if getattr(args, f.name, None) is not None:
                setattr(self.sizes, f.name, getattr(args, f.name))
        rows = {r.name: r for r in protocol_rows(self.sizes.annotations)}
        asked = list(rows) if args.rows == "all" else args.rows.split(",") if args.rows else []
        asked = asked or list(primary_rows(self.sizes.annotations))
        unknown = [r for r in asked if r not in rows]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(rows)}")
        self.rows = [rows[r] for r in asked]
        self.reference = f"real-{self.sizes.annotations}-aug"
        self.protocol_path = args.protocol
        self._cases = {split: openkbp.read_cases(self.data, split) for split in ("train", "validation")}
        self.dev = dev_split(args.dev_split, [c.name for c in self._cases["train"]])
        self._slices: dict[str, openkbp.CaseSlices] = {}
        self._pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]] | None = None
        self._G = None

    # --- data
    def cases(self, which: str) -> list[openkbp.Case]:
        """ "pool" (train minus dev: every training set), "dev" (every choice) or "test" (validation, once)."""
        if which == "test":
            return self._cases["validation"][: self.sizes.test_patients or None]
        dev = set(self.dev)
        return [c for c in self._cases["train"] if (c.name in dev) == (which == "dev")]

    def slices(self, case: openkbp.Case) -> openkbp.CaseSlices:
        if case.name not in self._slices:
            self._slices[case.name] = openkbp.load_case(case, self.sizes.size)
        return self._slices[case.name]

    def pool(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """Every pool slice: images (N, 1, S, S), masks (N, S, S) uint8, contoured (N, n_classes), ids "case:z"."""
        if self._pool is None:
            cs = [self.slices(c) for c in self.cases("pool")]
            ids = [f"{c.case.name}:{b.z}" for c in cs for b in c.boxes]
            contoured = torch.stack([contoured_row(c.case.organs_present) for c in cs for _ in range(len(c.images))])
            masks = torch.cat([c.organs for c in cs]).to(torch.uint8)
            self._pool = torch.cat([c.images for c in cs]), masks, contoured, ids
        return self._pool

    def draw(self, n: int, draw: int) -> list[int]:
        """Indices of `n` pool slices showing an organ, drawn by `draw` (draw d of real-2n extends draw d of real-n)."""
        _, masks, _, _ = self.pool()
        labelled = torch.nonzero((masks > 0).flatten(1).any(1))[:, 0].numpy()
        order = np.random.default_rng(1000 + draw).permutation(labelled)
        return sorted(order[:n].tolist())

    def score(self, model_file: Path, which: str) -> dict[str, dict]:
        """{patient: patient_scores} of a segmentation checkpoint over the dev or test patients (3D, CT grid)."""
        from labelfactory.io import read_image
        from labelfactory.segmentation.infer import load_segmenter, segment_image

        segmenter = load_segmenter(model_file)
        out = {}
        for case in self.cases(which):
            pred = segment_image(segmenter, read_image(case.ct), batch_size=64).array
            out[case.name] = patient_scores(pred, openkbp.read_array(case.label), case)
        return out

    # --- stages
    def needs(self, stage: str) -> bool:
        """Whether the asked rows need a stage (the real rows need neither generator nor labels nor synthetic)."""
        if stage in ("generator", "labels", "synthetic"):
            return any(r.synthetic for r in self.rows)
        if stage == "annotator":
            return any(r.synthetic or r.relabel for r in self.rows)
        return True

    def stage_generator(self, folder: Path) -> dict:
        """The generator file (--generator, or benchmarks/label_efficiency/gan.sh run here) and its FID against
        the dev patients' slices at psi 1 and at the synthesis psi."""
        from labelfactory.evaluation.fid import FIDEvaluator
        from labelfactory.segmentation.data import evenly_spaced
        from labelfactory.stylegan2.checkpoint import load_generator

        target = self.work / "generator" / "stylegan2.pt"
        if not target.is_file():
            if self.args.generator:
                copy_model(self.args.generator, target)
            else:
                run_logged(
                    ["bash", str(PROTOCOL_DIR / "gan.sh"), str(self.data), str(folder / "gan")], folder / "gan.log"
                )
                copy_model(folder / "gan" / "stylegan2.pt", target)
        G = load_generator(target)
        reals = torch.cat([self.slices(c).images for c in self.cases("dev")])
        idx = evenly_spaced(len(reals), self.sizes.fid_images)
        evaluator = FIDEvaluator.create(reals[idx], len(idx))
        fid = {}
        for psi in (1.0, self.sizes.psi):
            fid[str(psi)] = evaluator(G, truncation_psi=psi) if evaluator is not None else None
        return {
            "generator": str(target),
            "kimg": float(G.checkpoint_info["kimg"]),
            "fid_vs_dev": fid,
            "images": len(idx),
        }

    def stage_annotator(self, folder: Path) -> dict:
        """The stand-in annotator: the library trainer on every pool slice (partial contours), scored on dev; its
        overlap with the GAN's training patients (gan.sh trains on the whole train split) reported."""
        from labelfactory.segmentation.data import RealSlices
        from labelfactory.segmentation.train import train_segmenter

        images, masks, contoured, ids = self.pool()
        config = row_config(self.sizes.network, self.sizes.size, self.sizes.annotator_steps, self.sizes.batch_size, 0)
        model = folder / "segmentation.pt"
        if not model.is_file():
            pairs = RealSlices(images, masks, ids, contoured)
            train_segmenter(pairs, None, config, out=model, data={"pool": len(ids)}, state_file=folder / "state.pt")
        pool = [c.name for c in self.cases("pool")]
        gan = {c.name for c in self._cases["train"]}
        return {
            "model": str(model),
            "dev": strip_per_patient(self.score(model, "dev")),
            "patients": len(pool),
            "gan_overlap": {"patients": len(set(pool) & gan), "of": len(pool), "gan_patients": len(gan)},
        }

    def sets(self) -> tuple[str, ...]:
        """The synthetic sets the asked rows train on."""
        return tuple(s for s in SETS if any(r.synthetic == s for r in self.rows))

    def stage_labels(self, folder: Path) -> dict:
        """`annotations` generated images labelled by the annotator per set asked: "random" (seeds from
        RANDOM_SEED0, `labelfactory annotate`), "uncertainty" (`generated_uncertain` through a real server loop);
        the other set is left "pending"."""
        sets, n = self.sets(), self.sizes.annotations
        random_dir = folder / "random"
        if "random" in sets and len(list(random_dir.glob("seed*.nii.gz"))) < n:
            run_logged(
                [
                    *CLI,
                    "annotate",
                    "--generator",
                    str(self.work / "generator" / "stylegan2.pt"),
                    "--seeds",
                    f"{RANDOM_SEED0}-{RANDOM_SEED0 + n - 1}",
                    "--annotator-model",
                    str(self.work / "annotator" / "segmentation.pt"),
                    "--out",
                    str(random_dir),
                ],
                folder / "annotate.log",
            )
        result = {}
        if "random" in sets:
            result["random"] = {"folder": str(random_dir), "count": len(list(random_dir.glob("seed*.nii.gz")))}
        if "uncertainty" in sets:
            result["uncertainty"] = self.server_loop(folder / "uncertainty")
        return result | {"pending": [name for name in SETS if name not in sets]}

    def labels_ready(self, name: str) -> bool:
        """Whether label set `name` ("random" or "uncertainty") has all its annotations."""
        folder = self.work / "labels" / name
        if name == "random":
            return len(list(folder.glob("seed*.nii.gz"))) >= self.sizes.annotations
        datastore = folder / "datastore"
        has = len(datastore_records(datastore)) if (datastore / "datastore_v2.json").is_file() else 0
        return has >= self.sizes.annotations

    def server_loop(self, folder: Path) -> dict:
        """`labelfactory serve` on a fresh datastore with the generator, `labelfactory loop` with the annotator."""
        f = self.factory
        datastore, models = folder / "datastore", folder / "models"
        datastore.mkdir(parents=True, exist_ok=True)
        models.mkdir(parents=True, exist_ok=True)
        if not (models / "stylegan2.pt").is_file():
            copy_model(self.work / "generator" / "stylegan2.pt", models / "stylegan2.pt")

        def labelled() -> int:
            return len(datastore_records(datastore)) if (datastore / "datastore_v2.json").is_file() else 0

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        conf = {
            "labels": "openkbp",
            "models": "datasetgan",
            "candidates": f.candidates,
            "explore": f.explore,
            "interpreter_members": f.members,
            "interpreter_max_epochs": f.interpreter_epochs,
            "skip_scoring": "true",  # the strategy scores its own candidates: a scoring run after each retraining
        }
        serve = [*CLI, "serve", "--studies", str(datastore), "--models", str(models), "--port", str(port)]
        serve += [arg for k, v in conf.items() for arg in ("--conf", k, str(v))]
        with open(folder / "server.log", "a") as server_log:
            server = subprocess.Popen(serve, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_for_server(url, server)
                todo = self.sizes.annotations - labelled()
                log(f"labels: server at {url}; {todo} of {self.sizes.annotations} annotations to go")
                if todo > 0:
                    loop = [*CLI, "loop", "--server", url, "--rounds", str(todo)]
                    loop += ["--retrain-every", str(f.retrain_every)]
                    loop += ["--annotator-model", str(self.work / "annotator" / "segmentation.pt")]
                    run_logged(loop, folder / "loop.log")
            finally:
                stop(server)
        return {"folder": str(datastore), "count": labelled(), "server": serve, "loop_log": str(folder / "loop.log")}

    @property
    def G(self):
        """The generator of the generator stage (loaded once)."""
        from labelfactory.stylegan2.checkpoint import load_generator

        if self._G is None:
            self._G = load_generator(self.work / "generator" / "stylegan2.pt")
        return self._G

    def stage_synthetic(self, folder: Path) -> dict:
        """Per label set asked: the interpreter trained on it (one recipe for both), then the synthetic pairs
        (`pairs` kept of `pairs / (1 - drop_fraction)` seeds from SYNTH_SEED0, the most uncertain dropped); a set
        is whole once its `<set>/done.json` is written."""
        from labelfactory.datasetgan.labeller import load_interpreter
        from labelfactory.datasetgan.synthesis import synthesize

        f, sets = self.factory, self.sets()
        n_seeds = math.ceil(f.pairs / (1 - f.drop_fraction))
        spacing = float(np.median([c.spacing_mm[0] for c in self._cases["train"]]))  # in-plane mm
        result, pending = {}, []
        for name in SETS:
            d = folder / name
            interp_file = d / "datasetgan.pt"
            if read_json(d / "done.json") is not None:
                result[name] = read_json(d / "done.json")
                continue
            if name not in sets or (not interp_file.is_file() and not self.labels_ready(name)):
                pending.append(name)
                continue
            if not interp_file.is_file():
                self.train_interpreter(name, interp_file)
            res = synthesize(
                load_interpreter(interp_file, self.G),
                list(range(SYNTH_SEED0, SYNTH_SEED0 + n_seeds)),
                d / "pairs",
                drop_fraction=f.drop_fraction,
                window=openkbp.WINDOW,
                spacing=(spacing, spacing),
                progress=False,
            )
            result[name] = {
                "interpreter": str(interp_file),
                "pairs": str(d / "pairs"),
                "kept": len(res.kept),
                "dropped": len(res.dropped),
            }
            write_json_atomic(result[name], d / "done.json")  # the set is whole: its rows may train on it
            log(f"synthetic {name}: {len(res.kept)} pairs kept, {len(res.dropped)} dropped")
        if result:
            pairs_figure(folder / "pairs.png", {n: folder / n / "pairs" for n in result})
        return {**result, "figure": str(folder / "pairs.png"), "pending": pending}

    def train_interpreter(self, name: str, out: Path) -> None:
        """The style interpreter (ensemble) on label set `name`, saved to `out`."""
        from labelfactory.datasetgan.labeller import save_interpreter
        from labelfactory.datasetgan.records import load_records, records_from_seed_masks
        from labelfactory.datasetgan.train import DatasetGANConfig, train_ensemble
        from labelfactory.latent_record import TRUNCATION_PSI

        G, k, labels = self.G, len(LABEL_NAMES), self.work / "labels"
        cfg = DatasetGANConfig(members=self.factory.members, max_epochs=self.factory.interpreter_epochs)
        if name == "random":
            records = records_from_seed_masks(G, labels / "random", TRUNCATION_PSI, k, cfg.ignore_index)
        else:
            records = load_records(G, datastore_records(labels / "uncertainty" / "datastore"), k, cfg.ignore_index)
        log(f"synthetic {name}: interpreter on {len(records)} annotated images")
        ensemble, history = train_ensemble(G, records, k, cfg, progress=False)
        data = {"images": [r.name for r in records], "count": len(records), "history": history, "selection": name}
        save_interpreter(out, ensemble, LABEL_NAMES, cfg.to_dict(), data, G)

    def synthetic_pairs(self, name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(N, 1, S, S) images in [-1, 1], (N, S, S) uint8 masks and a record of synthetic set `name`."""
        from labelfactory.io import read_image

        if read_json(self.work / "synthetic" / name / "done.json") is None:  # never train on a half-written set
            raise SystemExit(f"the rows on the {name} set need it synthesized first (stage synthetic)")
        folder = self.work / "synthetic" / name / "pairs"
        files = sorted((folder / "images").glob("seed*.nii.gz"))
        images = torch.from_numpy(np.stack([openkbp.WINDOW.to_unit(read_image(f).array) for f in files]))[:, None]
        masks = torch.from_numpy(
            np.stack([read_image(folder / "labels" / f.name).array for f in files]).astype(np.uint8)
        )
        return images, masks, {"synthetic": str(folder), "pairs": len(files)}

    def stage_choose(self, folder: Path) -> dict:
        """Every choice on the dev split: the step budget (augmented real-n, draw 0, seed 0, by dev per-patient
        Dice) and the hybrid's real share (when a share row is asked). Writes `choices` for --freeze. Several
        processes may run it at once: they share its trials (`dev_trials`)."""
        steps = [int(s) for s in self.sizes.steps_grid.split(",")]
        ref = Row(self.reference, real=self.sizes.annotations, augment=True)
        trials = self.dev_trials([(f"steps={s}", folder / f"steps{s}", ref, s, {}) for s in steps])
        best_steps = max(steps, key=lambda s: trials[f"steps={s}"])
        chosen = {"steps": best_steps, "augment": "nnunet2d"}
        share_rows = [r for r in self.rows if r.mix == "share"]
        if share_rows:
            shares = [float(x) for x in self.sizes.share_grid.split(",")]
            row = Row("hybrid-share-dev", real=self.sizes.annotations, synthetic=share_rows[0].synthetic, mix="share")
            specs = [(f"real_share={x}", folder / f"share{x}", row, best_steps, {"real_share": x}) for x in shares]
            trials |= self.dev_trials(specs)
            chosen["real_share"] = max(shares, key=lambda x: trials[f"real_share={x}"])
        semi_rows = [r for r in self.rows if r.semi]
        if semi_rows:
            weights = [float(x) for x in self.sizes.consistency_grid.split(",")]
            row = Row("mean-teacher-dev", real=self.sizes.annotations, semi=True, augment=True)
            trials |= self.dev_trials(
                [(f"consistency={w}", folder / f"consistency{w}", row, best_steps, {"consistency": w}) for w in weights]
            )
            chosen["consistency"] = max(weights, key=lambda w: trials[f"consistency={w}"])
        chosen["explore"] = self.factory.explore if self.needs("labels") else None
        chosen["gan_snapshot"] = (
            str(self.args.generator or "gan.sh's last publish") if self.needs("generator") else None
        )
        return {"choices": chosen, "dev_mean_dice": trials, "dev": self.dev}

    def dev_trials(self, specs: list[tuple[str, Path, Row, int, dict]]) -> dict[str, float]:
        """{key: dev Dice} of trials (key, folder, row, steps, extra): a trial another process is training is left
        to it (a non-blocking lock per folder) and waited for at the end, so N processes share the trials."""
        out: dict[str, float] = {}
        for blocking in (False, True):
            for key, d, row, steps, extra in specs:
                if key in out:
                    continue
                d.mkdir(parents=True, exist_ok=True)
                with open(d / "trial.lock", "a") as lock:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                    except BlockingIOError:
                        continue
                    out[key] = self.dev_trial(d, row, steps, **extra)
        return {key: out[key] for key, *_ in specs}

    def dev_trial(self, d: Path, row: Row, steps: int, **extra) -> float:
        """Train one row (draw 0, seed 0) into `d` and return its dev mean of per-patient Dice."""
        ev = read_json(d / "dev.json")
        if ev is None:
            model = self.train_row(
                row, 0, 0, d, {"steps": steps, "augment": "nnunet2d" if row.augment else "none"} | extra
            )
            ev = {"per_patient": self.score(model, "dev")}
            write_json_atomic(ev, d / "dev.json")
            self.keep("choose")
        return float(np.nanmean([p["dice"] for p in ev["per_patient"].values()]))

    def units(self) -> list[tuple[Row, int, int]]:
        """(row, draw, seed) of every final segmenter, in rounds: round k holds draw-and-seed k of every drawn row
        and seed k of every undrawn one, rows in their order, so a cut run has every row at the same depth."""
        s = self.sizes
        units = []
        for k in range(max(s.draws * s.seeds, s.undrawn_seeds)):
            for r in self.rows:
                if r.has_draw and k < s.draws * s.seeds:
                    units.append((r, k // s.seeds, k % s.seeds))
                elif not r.has_draw and k < s.undrawn_seeds:
                    units.append((r, 0, k))
        return units

    def mine(self) -> list[tuple[Row, int, int]]:
        """The units this process takes: every one, or with --worker K/N every N-th from the K-th (1-based)."""
        k, n = self.args.worker
        return self.units()[k - 1 :: n]

    def frozen_choices(self, stage: str) -> dict:
        """The frozen choices; refused when the sizes differ from the frozen ones or a row's choice was not made."""
        protocol = read_protocol(self.protocol_path)
        choices = require_frozen(protocol, self.protocol_path, stage)
        frozen_sizes = protocol.get("sizes")
        if frozen_sizes is not None and frozen_sizes != asdict(self.sizes):
            changed = sorted(k for k, v in asdict(self.sizes).items() if frozen_sizes.get(k) != v)
            raise SystemExit(f"stage {stage} refused: sizes {changed} differ from the frozen protocol's")
        needed = {"share": "real_share", "semi": "consistency"}
        for row in self.rows:
            for kind, key in needed.items():
                if (row.mix == "share" if kind == "share" else row.semi) and key not in choices:
                    raise SystemExit(f"row {row.name} needs {key}, which the frozen protocol did not choose")
        return choices

    def stage_segmenters(self, folder: Path) -> dict:
        """Every row's segmenters with the frozen choices (refused before the protocol is frozen); a worker trains
        its share and leaves the others "pending"."""
        choices = self.frozen_choices("segmenters")
        for row, draw, seed in self.mine():
            extra = {"steps": choices["steps"], "augment": choices["augment"] if row.augment else "none"}
            if row.mix == "share":
                extra["real_share"] = choices["real_share"]
            if row.semi:
                extra["consistency"] = choices["consistency"]
            if self.scored(unit_name(row, draw, seed)):
                continue
            self.train_row(row, draw, seed, folder / unit_name(row, draw, seed), extra)
            self.test_unit((row, draw, seed))
            self.keep("segmenters")
        names = [unit_name(*u) for u in self.units()]
        pending = [n for n in names if not (folder / n / "data.json").is_file() and not self.scored(n)]
        return {"models": names, "choices": choices, "pending": pending}

    def scored(self, name: str) -> bool:
        return (self.work / "test" / f"{name}.json").is_file()

    def test_unit(self, unit: tuple[Row, int, int]) -> None:
        """Score one trained final segmenter on the validation patients, once (a written score is never
        recomputed): as soon as it is trained, so that the score, not the weights, is what --keep carries."""
        name, folder = unit_name(*unit), self.work / "test"
        data = read_json(self.work / "segmenters" / name / "data.json")
        if self.scored(name) or data is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        c0 = cpu_seconds()
        row, draw, seed = unit
        model = self.work / "segmenters" / name / "segmentation.pt"
        scores = self.score(model, "test")
        write_json_atomic(
            {"row": row.name, "draw": draw, "seed": seed, **data, "per_patient": scores}, folder / f"{name}.json"
        )
        add_cpu(folder, cpu_seconds() - c0)
        self.keep("test")

    def stage_test(self, folder: Path) -> dict:
        """Each final segmenter on the validation patients, once (the segmenters stage scores each as it is
        trained; this scores any trained before that rule)."""
        self.frozen_choices("test")
        for unit in self.mine():
            self.test_unit(unit)
        names = [unit_name(*u) for u in self.units()]
        return {"scored": names, "pending": [n for n in names if not self.scored(n)]}

    def keep(self, stage: str) -> None:
        """Carry `stage`'s kept files into --keep (when given)."""
        if self.args.keep is not None and (n := keep_files(self.work, self.args.keep, stage)):
            log(f"kept {n} file(s) of stage {stage} in {self.args.keep}")

    def train_row(self, row: Row, draw: int, seed: int, d: Path, extra: dict) -> Path:
        """Train one (row, draw, seed) segmenter into `d/segmentation.pt` with the library trainer (resumable); its
        training data (real-slice ids, synthetic set) and recipe recorded in `d/data.json`. `extra`: steps, augment,
        real_share for the share hybrids, consistency for the Mean Teacher; the fine-tune hybrids train on the
        synthetic set into `d/pretrain/`, then on the real slices from those weights, each for `steps`."""
        from labelfactory.segmentation.train import train_segmenter

        model = d / "segmentation.pt"
        if model.is_file():
            return model
        d.mkdir(parents=True, exist_ok=True)
        real, synthetic, data = self.training_pairs(row, draw)
        recipe = dict(extra)
        steps = recipe.pop("steps")
        size, network, batch = self.sizes.size, self.sizes.network, self.sizes.batch_size
        if row.mix == "finetune":  # the pre-training depends on the seed, not the draw: shared by the draws
            pretrain = d.parent / f"pretrain.{row.synthetic}.{recipe['augment']}.{steps}steps.seed{seed}"
            first = pretrain / "segmentation.pt"
            first.parent.mkdir(parents=True, exist_ok=True)
            with open(first.with_name("train.lock"), "a") as lock:  # two workers may need it at once: one trains
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not first.is_file():
                    config = row_config(network, size, steps, batch, seed, augment=recipe["augment"])
                    state = first.with_name("state.pt")
                    train_segmenter(synthetic, None, config, out=first, data=data, state_file=state)
            config = row_config(network, size, steps, batch, seed, augment=recipe["augment"], init_from=str(first))
            train_segmenter(real, None, config, out=model, data=data, state_file=d / "state.pt")
        else:
            train, beside = (synthetic, real) if synthetic is not None else (real, None)
            config = row_config(network, size, steps, batch, seed, **recipe)
            unlabelled = None
            if row.semi:
                images, _, _, ids = self.pool()
                unlabelled = UnlabelledSlices(images, ids)
                data["unlabelled_slices"] = f"all {len(ids)} pool slices"
            train_segmenter(
                train,
                None,
                config,
                out=model,
                data=data,
                real_set=beside,
                state_file=d / "state.pt",
                unlabelled_set=unlabelled,
            )
        write_json_atomic(data | {"recipe": extra}, d / "data.json")
        return model

    def training_pairs(self, row: Row, draw: int) -> tuple[RealSlices | None, RealSlices | None, dict]:
        """(real slices, synthetic pairs, data record) of one row and draw; None where the row has none. Items as
        `segmentation.data`: real slices flagged with their patient's contours (or complete when relabelled)."""
        from labelfactory.segmentation.data import RealSlices

        real = synthetic = None
        data: dict = {}
        if row.real:
            images, masks, contoured, ids = self.pool()
            pick = list(range(len(images))) if row.real < 0 else self.draw(row.real, draw)
            images, masks, contoured = images[pick], masks[pick], contoured[pick]
            if row.relabel:
                masks, contoured = self.relabel(images), torch.ones_like(contoured)
            real = RealSlices(images, masks, [ids[i] for i in pick], contoured)
            data["real_slices"] = [ids[i] for i in pick] if row.real > 0 else f"all {len(pick)} pool slices"
        if row.synthetic:
            images, masks, record = self.synthetic_pairs(row.synthetic)
            synthetic = RealSlices(
                images, masks, [f"synthetic{i}" for i in range(len(images))], classes=len(LABEL_NAMES)
            )
            data["synthetic"] = record
        return real, synthetic, data

    def relabel(self, images: torch.Tensor) -> torch.Tensor:
        """The annotator's masks (N, S, S) uint8 of (N, 1, S, S) crops: complete labels for the relabelled row."""
        from labelfactory.segmentation.infer import load_segmenter, predict_slices

        annotator = load_segmenter(self.work / "annotator" / "segmentation.pt")
        return predict_slices(annotator.network, images, 64).to(torch.uint8)

    def stage_report(self, folder: Path) -> dict:
        """The results JSON (per row, draw, seed and patient; commit; stages' CPU-hours) and section 0's table."""
        results = {
            "commit": git_commit(),
            "protocol": read_protocol(self.protocol_path),
            "sizes": asdict(self.sizes),
            "reference": self.reference,
            "dev": self.dev,
            "stages": {
                s: (read_json(self.work / s / "done.json") or {}).get("result") for s in RUN_STAGES if s != "report"
            },
            "cpu_hours": {
                s: d["cpu_hours"] for s in RUN_STAGES if (d := read_json(self.work / s / "done.json")) is not None
            },
            "runs": [read_json(p) for p in sorted((self.work / "test").glob("*.json")) if p.name != "done.json"],
        }
        results["runs"] = [r for r in results["runs"] if r is not None and "per_patient" in r]
        out = self.args.results or folder / "label_efficiency.json"
        write_json_atomic(results, out)
        table = results_table(results)
        (folder / "table.md").write_text(table)
        if self.args.publish:
            publish_table(table, REPO / "docs" / "RESULTS.md")
        return {"results": str(out), "table": str(folder / "table.md")}


def strip_per_patient(scores: dict[str, dict]) -> dict:
    """Dev scores kept in a stage record: per-patient Dice and HD95, no per-organ detail."""
    return {k: {"dice": v["dice"], "hd95": v["hd95"]} for k, v in scores.items()}


# ---------------------------------------------------------------------------------------------- the table from JSON


def results_table(results: dict) -> str:
    """Section 0's markdown table from the results JSON alone (so `report` regenerates it exactly).

    Per row: runs (draws x seeds); mean +- sample SD and 95% t interval over runs of the per-run mean of per-patient
    Dice; HD95 likewise; the paired difference to the reference row over (patient, draw) units (seeds averaged;
    a row without draws is paired by patient with the reference's mean over draws) with paired-t and Wilcoxon
    p-values, Holm-corrected over the rows compared.
    """
    from labelfactory.evaluation.statistics import holm, paired_test, summary

    by_row: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_row.setdefault(r["row"], []).append(r)
    ref = results["reference"]

    def units(runs: list[dict]) -> dict[tuple[str, int], float]:
        """(patient, draw) -> Dice averaged over seeds."""
        acc: dict[tuple[str, int], list[float]] = {}
        for r in runs:
            for p, s in r["per_patient"].items():
                acc.setdefault((p, r["draw"]), []).append(s["dice"])
        return {k: float(np.nanmean(v)) for k, v in acc.items()}

    ref_units = units(by_row.get(ref, []))
    tests = {}
    for name, runs in by_row.items():
        if name == ref or not ref_units:
            continue
        mine = units(runs)
        if {d for _, d in mine} == {0} < {d for _, d in ref_units}:  # no draw: against the reference's draw mean
            patients = sorted({p for p, _ in ref_units})
            ref_mean = {p: float(np.nanmean([v for (q, _), v in ref_units.items() if q == p])) for p in patients}
            tests[name] = paired_test(
                [mine.get((p, 0), float("nan")) for p in patients], [ref_mean[p] for p in patients]
            )
            continue
        keys = sorted(ref_units)
        tests[name] = paired_test([mine.get(k, float("nan")) for k in keys], [ref_units[k] for k in keys])
    names = list(tests)
    t_adj = dict(zip(names, holm([tests[n]["t_p"] for n in names]), strict=True))
    w_adj = dict(zip(names, holm([tests[n]["wilcoxon_p"] for n in names]), strict=True))

    lines = [
        f"| row | runs (draws x seeds) | Dice (per patient) mean +- SD | 95% CI | HD95 mm | diff vs {ref} | "
        "p paired t (Holm) | p Wilcoxon (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in by_row.items():
        dice = summary([float(np.nanmean([p["dice"] for p in r["per_patient"].values()])) for r in runs])
        dist = summary([float(np.nanmean([p["hd95"] for p in r["per_patient"].values()])) for r in runs])
        draws, seeds = len({r["draw"] for r in runs}), len({r["seed"] for r in runs})
        t = tests.get(name)
        lines.append(
            f"| {name} | {len(runs)} ({draws} x {seeds}) | {dice['mean']:.3f} +- {num(dice['sd'])} | "
            f"[{num(dice['ci_t'][0])}, {num(dice['ci_t'][1])}] | {num(dist['mean'], 1)} | "
            + (
                f"{t['mean_diff']:+.3f} (n={t['n']}) | {num(t_adj[name])} | {num(w_adj[name])} |"
                if t
                else "reference | | |"
            )
        )
    return "\n".join(lines) + "\n"


def num(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def publish_table(table: str, results_md: Path) -> None:
    """Replace the text between TABLE_MARKERS in `results_md` with `table` (SystemExit when the markers are absent)."""
    text = results_md.read_text()
    start, end = TABLE_MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"{results_md} has no {start} ... {end} markers for the table")
    head, rest = text.split(start, 1)
    results_md.write_text(f"{head}{start}\n{table}{end}{rest.split(end, 1)[1]}")


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="label_efficiency.py run", description="rebuild docs/RESULTS.md section 0")
    p.add_argument("--openkbp", type=Path, required=True, help="OpenKBP folder (cases.csv + volumes)")
    p.add_argument("--work", type=Path, required=True, help="work folder: one sub-folder per stage, resumable")
    p.add_argument("--generator", type=Path, help="an existing generator file instead of running gan.sh")
    p.add_argument("--rows", default="", help="comma-separated rows, or all (default: primary_rows)")
    p.add_argument("--stages", default=",".join(RUN_STAGES), help=f"subset of {','.join(RUN_STAGES)}")
    p.add_argument("--dev-split", type=Path, default=PROTOCOL_DIR / "dev_split.json")
    p.add_argument("--protocol", type=Path, default=PROTOCOL_DIR / "protocol.json")
    p.add_argument("--results", type=Path, help="results JSON (default: WORK/report/label_efficiency.json)")
    p.add_argument("--freeze", action="store_true", help="write the choose stage's choices into --protocol, frozen")
    p.add_argument("--publish", action="store_true", help="write the table into docs/RESULTS.md between its markers")
    p.add_argument(
        "--keep",
        type=Path,
        help="folder (committed) that carries each stage's records, small models and the test scores between "
        "machines: restored into --work where missing at the start, updated as work finishes",
    )
    p.add_argument("--reduced", action="store_true", help="tiny sizes (the test suite)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--worker",
        type=worker,
        default=(1, 1),
        help="K/N: this process trains and scores every N-th final segmenter from the K-th (run N at once, "
        "after --freeze; a last run without it marks the stages done)",
    )
    for f in fields(RunSizes):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, help=f"default {f.default}")
    return p.parse_args(argv)


def worker(text: str) -> tuple[int, int]:
    """ "K/N" -> (K, N) with 1 <= K <= N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--worker {text!r}: expected K/N, e.g. 1/2") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--worker {text!r}: K must be in 1..N")
    return k, n


def unit_name(row: Row, draw: int, seed: int) -> str:
    return f"{row.name}.draw{draw}.seed{seed}"


def run_main(argv: list[str]) -> int:
    """`run`: every asked stage in order, each skipped when done; stops before segmenters until frozen."""
    args = parse_run_args(argv)
    torch.set_num_threads(args.threads)
    exp = Run(args)
    if args.keep is not None and args.keep.is_dir():
        log(f"restored {restore_kept(args.keep, args.work)} kept file(s) from {args.keep}")
    asked = args.stages.split(",")
    for name in RUN_STAGES:
        if name not in asked or not exp.needs(name):
            continue
        if name == "segmenters":
            if args.freeze:
                chosen = read_json(args.work / "choose" / "done.json")
                if chosen is None:
                    raise SystemExit("--freeze: the choose stage has not finished")
                rows = [r.name for r in exp.rows]
                freeze(args.protocol, chosen["result"]["choices"], exp.dev, asdict(exp.sizes), rows)
                log(f"protocol frozen: {args.protocol}")
            if not read_protocol(args.protocol).get("frozen"):
                log(f"choices made on the dev split ({args.work / 'choose' / 'done.json'}); rerun with --freeze")
                return 0
        if name in ("segmenters", "test", "report"):  # always entered: the rows may have grown (a done unit is kept)
            exp.frozen_choices(name)
            (args.work / name / "done.json").unlink(missing_ok=True)
        run_stage(args.work, name, getattr(exp, f"stage_{name}"))
        exp.keep(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`[run] ARGS`: the protocol (the `run` word is optional)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(argv[1:] if argv[:1] == ["run"] else argv)


if __name__ == "__main__":
    sys.exit(main())
