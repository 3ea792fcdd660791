"""Build sample-data/ from the TotalSegmentator test references in ../shared/sample-data (run once).

Writes a MONAI Label local datastore (images + labels/final, app label values), the raw DICOM
series for the DICOMweb path, the thorax study's reference masks, and the image-level labels.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

from labelfactory.io import read_image, write_image
from labelfactory.labels import map_totalsegmentator

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/sample-data/totalsegmentator-tests")
DST = Path(sys.argv[2] if len(sys.argv) > 2 else "sample-data")


def as_int16(img):
    return img.with_array(np.clip(img.array, -1024, 3071).astype(np.int16))


def label_on_grid(label_path, reference):
    """TotalSegmentator labels -> app values, resampled (nearest) onto the reference image's grid."""
    lab = sitk.ReadImage(str(label_path))
    lab = sitk.Resample(lab, reference.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
    arr = map_totalsegmentator(sitk.GetArrayFromImage(lab))
    return reference.with_array(arr)


def write_dicom_with_uids(src, dst, name):
    """Copy a DICOM series, filling the UIDs and numbers the anonymised source left empty.

    UIDs are derived from `name` (and each file's media-storage UID), so rebuilding gives the same ones;
    a PACS such as Orthanc refuses instances without them.
    """
    dst.mkdir(parents=True, exist_ok=True)
    study = generate_uid(entropy_srcs=[name, "study"])
    series = generate_uid(entropy_srcs=[name, "series"])
    for f in sorted(src.iterdir()):
        d = pydicom.dcmread(f)
        d.StudyInstanceUID, d.SeriesInstanceUID = study, series
        d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID
        d.SOPClassUID = d.file_meta.MediaStorageSOPClassUID
        d.SeriesNumber = d.get("SeriesNumber") or 1
        d.StudyID = d.get("StudyID") or "1"
        d.PatientID = d.PatientID or name
        d.PatientName = d.PatientName or name
        d.save_as(dst / f.name)


ds = DST / "datastore"
(ds / "labels" / "final").mkdir(parents=True, exist_ok=True)

torso = as_int16(read_image(SRC / "torso-3mm/ct.nii.gz"))
write_image(torso, ds / "torso_3mm.nii.gz")
write_image(label_on_grid(SRC / "torso-3mm/labels_total.nii.gz", torso), ds / "labels/final/torso_3mm.nii.gz")
write_image(as_int16(read_image(SRC / "torso-3mm/ct_112slices_unlabelled.nii.gz")), ds / "torso_3mm_long.nii.gz")

abdomen = as_int16(read_image(SRC / "abdomen-dicom/series"))
write_image(abdomen, ds / "abdomen.nii.gz")
write_image(label_on_grid(SRC / "abdomen-dicom/labels_total.nii.gz", abdomen), ds / "labels/final/abdomen.nii.gz")
write_dicom_with_uids(SRC / "abdomen-dicom/series", DST / "dicom/abdomen", "labelfactory-sample-abdomen")

thorax = as_int16(read_image(SRC / "thorax-aorta/ct.nii.gz"))
write_image(thorax, ds / "thorax_aorta.nii.gz")
ref = ds / "reference/thorax_aorta"
ref.mkdir(parents=True, exist_ok=True)
for m in sorted((SRC / "thorax-aorta").glob("mask_*.nii.gz")):
    shutil.copy(m, ref / m.name)

shutil.copy(SRC / "LICENSE", DST / "LICENSE")
shutil.copy(SRC / "total_class_map.json", DST / "total_class_map.json")
print("sample data written to", DST)
