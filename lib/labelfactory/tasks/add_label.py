"""`labelfactory add-label`: save a label into a folder datastore, saying which organs it contains.

The same validated, atomic write as the server's `PUT /datastore/label` (LabelFactoryDatastore.save_label):
the label must fit its image and the label map, and `--contoured` must name organs of the map. A
label without `--contoured` contains every organ; with it, the organs not named are "not contoured"
(their 0s are unknown, not background) and the segmenters' partial-label loss leaves them out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from monailabel.config import settings
from monailabel.interfaces.datastore import DefaultLabelTag

from labelfactory.labels import CONTOURED_KEY, LABEL_MAPS, label_map
from labelfactory.tasks.datastore import LabelFactoryDatastore


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("image_id", help="the image's id in the datastore (its file name less the suffix)")
    p.add_argument("label_file", type=Path, help="label map on the image's grid (.nii.gz, .nrrd, Slicer .seg.nrrd)")
    p.add_argument(
        "--contoured",
        default=None,
        help="comma-separated organ names the label contains, e.g. 'brainstem,mandible' (default: every organ)",
    )
    p.add_argument("--studies", type=Path, default=Path("."), help="the datastore folder (default: here)")
    p.add_argument("--tag", default=DefaultLabelTag.FINAL.value, help="label tag (default final: what trainers use)")
    p.add_argument(
        "--label-map",
        default="totalsegmentator",
        help=f"the data set's label map ({', '.join(LABEL_MAPS)}; default totalsegmentator)",
    )


def run(args: argparse.Namespace) -> int:
    """Save the label; print {image, tag, contoured} as JSON."""
    names = label_map(args.label_map).values
    info = {}
    if args.contoured is not None:
        info[CONTOURED_KEY] = [n.strip() for n in args.contoured.split(",") if n.strip()]
    store = LabelFactoryDatastore(
        str(args.studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False, label_names=names
    )
    store.require_image(args.image_id)
    store.save_label(args.image_id, str(args.label_file), args.tag, info)
    saved = store.get_label_info(args.image_id, args.tag)
    contoured = saved.get(CONTOURED_KEY, [n for n, v in names.items() if v])
    print(json.dumps({"image": args.image_id, "tag": args.tag, CONTOURED_KEY: contoured}))
    return 0
