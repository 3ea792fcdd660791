"""`labelfactory <command>`: every step of the pipeline, scriptable without a server.

Each command lives beside the code it drives, as a module with `configure(parser)` and
`run(args) -> int`; this file only lists them. Errors a user can fix print one line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from labelfactory.errors import LabelFactoryError

# command -> (module with configure/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": (
        "labelfactory.serve",
        "start the MONAI Label server on a folder of studies (default: the bundled sample data)",
    ),
    "loop": ("labelfactory.loop", "drive a running server through the active-learning loop with a simulated annotator"),
    "annotate": (
        "labelfactory.annotator",
        "label generated images with the simulated (HU-rule) annotator, for demos and tests",
    ),
    "train-datasetgan": (
        "labelfactory.datasetgan.cli",
        "train the DatasetGAN pixel-classifier ensemble on annotated generated images",
    ),
    "synthesize": (
        "labelfactory.datasetgan.cli_synthesize",
        "generate a labelled data set (images, masks, manifest, preview), the most uncertain pairs dropped",
    ),
    "train-clamnet": (
        "labelfactory.clamnet.cli",
        "train ClamNet (UNet++ pair) from image-level normal/abnormal labels",
    ),
    "train-segmentation": (
        "labelfactory.segmentation.cli",
        "train a 2D segmenter (UNet++ by default) on synthetic pairs, real labelled studies, or both",
    ),
    "evaluate": (
        "labelfactory.evaluation.cli",
        "the paper's segmentation experiments (tables I, II, III-C, III): mIoU over patient-wise folds",
    ),
    "train-stylegan2": (
        "labelfactory.stylegan2.cli",
        "train StyleGAN2-ADA on the CT slices of a folder of studies (torchrun for several GPUs)",
    ),
    "import-stylegan2": (
        "labelfactory.stylegan2.import_gan",
        "a stylegan2-ada-pytorch G_ema as our generator file (no code run)",
    ),
    "add-label": (
        "labelfactory.tasks.add_label",
        "save a label into a folder datastore, naming the organs it contains (--contoured; default every organ)",
    ),
    "openkbp-download": (
        "labelfactory.datasets.convert_openkbp",
        "download OpenKBP (head-and-neck CT, organs, PTVs), convert it to NIfTI + cases.csv (or --from a local copy)",
    ),
}
DEPRECATED = {"train-gan": "train-stylegan2", "import-gan": "import-stylegan2", "train-interpreter": "train-datasetgan"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="labelfactory", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen in DEPRECATED:  # the old name still runs (scripts keep working) and says what to use
        print(f"labelfactory {chosen} is deprecated: use labelfactory {DEPRECATED[chosen]}", file=sys.stderr)
        argv[argv.index(chosen)] = chosen = DEPRECATED[chosen]
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == chosen:  # only the command run is imported: all of them pulled in torch and MONAI (~5 s)
            importlib.import_module(module).configure(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except LabelFactoryError as e:
        print(f"labelfactory {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"labelfactory {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
