"""An image file's header, checked before a voxel is read: its format, its size against the limits, and the bytes
it declares against the bytes present.

ITK trusts headers: it allocates what a header declares (a 652-byte DICOM claiming 60000 x 60000 pixels was
killed for memory), zero-fills a short voxel block, and follows a header's data file anywhere on disk (an `.mhd`
whose `ElementDataFile` is `/etc/shadow`, an `.nhdr` whose `data file` is `/dev/zero`). So each file is read
here as a header only (NRRD's and MetaImage's text, DICOM through pydicom with large values deferred, any other
through ITK's `ReadImageInformation`), and refused unless:
- its voxels lie in the file itself: a NRRD with a `data file` field or a MetaImage whose `ElementDataFile` is not
  `LOCAL` is refused (no detached data, not even beside it: an upload arrives as one file);
- the bytes after the header hold what it declares (compressed data inflated and counted, never kept, and never
  past the declared size);
- its size passes `labelfactory.limits`: MAX_VOXELS in all, MAX_SLICES along any axis, and a 3D image is not a
  line of voxels (two axes under MIN_SIDE and one over: a 1 x 1 x 400 volume cost 400 slices' work for 78 bytes).
NIfTI's own checks (nibabel's header, in `io.image`) use `check_shape` and `inflate_bounded` from here.
"""

from __future__ import annotations

import bz2
import math
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

from labelfactory.errors import LabelFactoryError
from labelfactory.limits import MAX_SLICES, MAX_VOXELS

MIN_SIDE = 8  # a 3D image longer than this along one axis may be this thin along one other, not two
HEADER_BYTES = 1 << 16  # a text header (NRRD, MetaImage) longer than this is not one
_CHUNK = 1 << 20
# ITK's image IOs whose header alone this module trusts: NIfTI (checked in io.image) and the 2D picture formats,
# whose decoders fail on a short file; every other IO ITK knows is refused (Analyze .hdr/.img, VTK, GIPL, ...)
PICTURE_IOS = ("PNGImageIO", "JPEGImageIO", "TIFFImageIO")
TAKEN = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, attached data), MetaImage (.mha, or .mhd with LOCAL data), DICOM, "
    "PNG/JPEG/TIFF"
)


def check_shape(shape: Sequence[int], name: str) -> None:
    """The declared shape (any axis order) within MAX_VOXELS and MAX_SLICES, and not a line of voxels."""
    shape = [int(s) for s in shape]
    if any(s <= 0 for s in shape):
        raise LabelFactoryError(f"{name}: the image is empty (its header declares {_x(shape)} voxels)")
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS.value():
        raise LabelFactoryError(
            f"{name}: its header declares {_x(shape)} = {voxels} voxels, over the server's limit "
            f"({MAX_VOXELS.named()}); send a smaller or cropped image",
            status=413,
        )
    if max(shape) > MAX_SLICES.value():
        raise LabelFactoryError(
            f"{name}: its header declares {_x(shape)} voxels, over the server's limit of {MAX_SLICES.named()}; "
            "send fewer slices",
            status=413,
        )
    spatial = shape[:3]
    if len(spatial) == 3 and sum(s < MIN_SIDE for s in spatial) > 1 and max(spatial) > MIN_SIDE:
        raise LabelFactoryError(
            f"{name}: {_x(shape)} voxels is a line, not a volume (two axes under {MIN_SIDE} voxels); "
            "send a 2D slice or a 3D volume"
        )


def check_file(path: str | os.PathLike, name: str) -> str:
    """The image file at `path` (NIfTI excepted: io.image reads its header itself) checked from its header alone.

    Returns ITK's name of its format ("NrrdImageIO", ...); raises LabelFactoryError (4xx) for anything refused."""
    path = Path(path)
    io = sitk.ImageFileReader.GetImageIOFromFileName(str(path))
    checks: dict[str, Callable[[Path, str], None]] = {
        "NrrdImageIO": check_nrrd,
        "MetaImageIO": check_metaimage,
        "GDCMImageIO": check_dicom,
    }
    if io in checks:
        checks[io](path, name)
    elif io == "NiftiImageIO":
        raise LabelFactoryError(f"{name}: NIfTI in a file not named .nii or .nii.gz (or an Analyze pair); rename it")
    elif io not in PICTURE_IOS:
        what = f"a {io.removesuffix('ImageIO')} file" if io else "not a readable image"
        raise LabelFactoryError(f"{name}: {what}; expected {TAKEN}, complete and uncorrupted")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise LabelFactoryError(f"{name}: not a readable image ({str(e).strip().splitlines()[-1][:200]})") from None
    check_shape(reader.GetSize()[::-1], name)
    return io


# ---- NRRD: `NRRD000x`, `field: value` lines, a blank line, the data (attached) ----

_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short")
    + ("unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t")
    + ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_NRRD_ITEMSIZE = {t: size for size, names in _NRRD_TYPES.items() for t in names}


def check_nrrd(path: Path, name: str) -> None:
    """A NRRD: data attached (no `data file`), declared size within the limits, as many data bytes as declared."""
    head, offset = _text_header(path, name, "NRRD")
    fields: dict[str, str] = {}
    for line in head.splitlines()[1:]:
        if line.startswith("#") or ":=" in line or not line.strip():
            continue  # comments and key/value pairs (Slicer's segment names) say nothing about the data
        key, sep, value = line.partition(": ")
        key = key.strip().lower().replace(" ", "")
        if not sep:
            raise LabelFactoryError(f"{name}: not a readable NRRD header (line {line[:60]!r})")
        if key in fields:
            raise LabelFactoryError(f"{name}: the NRRD header gives '{key}' twice")
        fields[key] = value.strip()
    if "datafile" in fields:
        raise LabelFactoryError(
            f"{name}: a detached NRRD header (data file: {fields['datafile'][:80]}); save it as one file first "
            "(.nrrd with its data attached, .mha or .nii.gz)"
        )
    for skip in ("lineskip", "byteskip"):
        if fields.get(skip, "0") != "0":
            raise LabelFactoryError(f"{name}: NRRD '{skip}' is not taken for attached data; save the image again")
    try:
        sizes = [int(s) for s in fields["sizes"].split()]
        itemsize = _NRRD_ITEMSIZE[fields["type"].lower()]
        encoding = fields.get("encoding", "raw").lower()
    except (KeyError, ValueError) as e:
        raise LabelFactoryError(f"{name}: not a readable NRRD header (field {e} missing or wrong)") from None
    check_shape(sizes[::-1], name)
    n = math.prod(sizes)
    data_bytes = {"raw": n * itemsize, "hex": 2 * n * itemsize}.get(encoding, n)
    if encoding in ("gzip", "gz", "bzip2", "bz2"):
        _check_inflates(path, offset, n * itemsize, name, bz2.BZ2Decompressor if encoding.startswith("bz") else None)
    elif encoding in ("raw", "hex", "ascii", "text", "txt"):
        _check_bytes(path, offset, data_bytes, name)
    else:
        raise LabelFactoryError(f"{name}: NRRD encoding '{encoding}' is not taken (raw, gzip, bzip2, ascii, hex)")


# ---- MetaImage: `Key = Value` lines, the last one `ElementDataFile = LOCAL`, then the data ----

_MET_ITEMSIZE = {"CHAR": 1, "UCHAR": 1, "SHORT": 2, "USHORT": 2, "INT": 4, "UINT": 4, "LONG": 4, "ULONG": 4}
_MET_ITEMSIZE |= {"LONG_LONG": 8, "ULONG_LONG": 8, "FLOAT": 4, "DOUBLE": 8}


def check_metaimage(path: Path, name: str) -> None:
    """A .mha / .mhd: data in the file itself (`ElementDataFile = LOCAL`), size within the limits and present."""
    raw = _head_bytes(path)
    end = raw.find(b"ElementDataFile")
    line_end = raw.find(b"\n", end)
    if end < 0 or line_end < 0:
        raise LabelFactoryError(f"{name}: not a readable MetaImage header (no ElementDataFile line)")
    head = raw[:line_end].decode("latin-1")
    fields: dict[str, str] = {}
    for line in head.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    data_file = fields.get("elementdatafile", "")
    if data_file.upper() != "LOCAL":
        raise LabelFactoryError(
            f"{name}: its voxels are in another file (ElementDataFile = {data_file[:80]}); save it as one file "
            "first (.mha, .nrrd or .nii.gz; a .mhd needs ElementDataFile = LOCAL)"
        )
    if fields.get("headersize", "0") not in ("0", ""):
        raise LabelFactoryError(f"{name}: MetaImage HeaderSize is not taken; save the image again as .mha")
    try:
        sizes = [int(s) for s in fields["dimsize"].split()]
        kind = fields["elementtype"].upper().removeprefix("MET_").removesuffix("_ARRAY")
        itemsize = _MET_ITEMSIZE[kind] * int(fields.get("elementnumberofchannels", "1"))
    except (KeyError, ValueError) as e:
        raise LabelFactoryError(f"{name}: not a readable MetaImage header (field {e} missing or wrong)") from None
    check_shape(sizes[::-1], name)
    n = math.prod(sizes)
    if fields.get("compresseddata", "false").lower() == "true":
        _check_inflates(path, line_end + 1, n * itemsize, name)
    elif fields.get("binarydata", "true").lower() == "false":
        _check_bytes(path, line_end + 1, n, name)  # text: at least one character a value
    else:
        _check_bytes(path, line_end + 1, n * itemsize, name)


# ---- DICOM (one file): pixels declared vs present ----


def check_dicom(path: Path, name: str) -> None:
    """One DICOM file: declared rows x columns x frames within the limits, its native pixel data all present."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024, force=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated)
    except (InvalidDicomError, AttributeError, ValueError, TypeError, OSError, EOFError) as e:
        raise LabelFactoryError(f"{name}: not a readable DICOM image ({str(e)[:200]})") from None
    check_shape((frames, rows, cols), name)
    pixels = ds.get_item(0x7FE00010)
    if pixels is None:
        raise LabelFactoryError(f"{name}: a DICOM file without pixel data")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        return  # encapsulated: its decoder fails on a short frame, and the size it decodes to was checked above
    needed = rows * cols * frames * samples * bits // 8
    if isinstance(pixels, RawDataElement):
        length, at = pixels.length, pixels.value_tell
        present = min(length, os.path.getsize(path) - at) if length != 0xFFFFFFFF else -1
    else:
        present = len(pixels.value or b"")
    if present < needed:
        raise LabelFactoryError(
            f"{name}: truncated DICOM: {max(present, 0)} bytes of pixel data where its header declares "
            f"{rows} x {cols} x {frames} at {bits} bits ({needed} bytes); copy it again from its source"
        )


def check_dicom_series(files: Sequence[str], name: str) -> None:
    """A series: the whole volume within the limits (from its first file's header), then each file (check_dicom)."""
    try:
        first = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
        rows, cols = int(first.Rows), int(first.Columns)
    except (InvalidDicomError, AttributeError, ValueError, TypeError, OSError, EOFError) as e:
        raise LabelFactoryError(f"{name}: not a readable DICOM series ({str(e)[:200]})") from None
    check_shape((len(files), rows, cols), name)
    for f in files:
        check_dicom(Path(f), f"{name}/{Path(f).name}")


# ---- shared: bytes present, compressed data inflated up to its declared size ----


def inflate_bounded(path: Path, offset: int, limit: int, name: str, sink: Callable[[bytes], None] | None = None) -> int:
    """Inflate the gzip/zlib stream(s) from `offset` of `path`, at most `limit` bytes (the rest is never made).

    Each inflated chunk goes to `sink` (if given); returns how many bytes were inflated. Corrupt data raises."""
    made = 0
    obj = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip header, whichever the stream has
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            pending = f.read(_CHUNK)
            while made < limit and pending:
                out = obj.decompress(pending, min(_CHUNK, limit - made))
                made += len(out)
                if sink is not None and out:
                    sink(out)
                if obj.unconsumed_tail:
                    pending = obj.unconsumed_tail
                elif obj.eof and obj.unused_data:  # another gzip member follows
                    pending, obj = obj.unused_data, zlib.decompressobj(zlib.MAX_WBITS | 32)
                elif obj.eof:
                    break
                else:
                    pending = f.read(_CHUNK)
    except zlib.error as e:
        raise LabelFactoryError(
            f"{name}: not a readable image: corrupt compressed data ({e}); copy it again from its source"
        ) from None
    return made


def _check_inflates(path: Path, offset: int, needed: int, name: str, bz2_type=None) -> None:
    """The compressed data from `offset` inflate to at least `needed` bytes (counted, not kept; never more made)."""
    if bz2_type is None:
        made = inflate_bounded(path, offset, needed, name)
    else:
        made, obj = 0, bz2_type()
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(_CHUNK)
                while made < needed and not obj.eof and (data or not obj.needs_input):
                    made += len(obj.decompress(data, min(_CHUNK, needed - made)))
                    data = f.read(_CHUNK) if obj.needs_input else b""  # b"": more of what it holds
        except (OSError, EOFError, ValueError) as e:
            raise LabelFactoryError(f"{name}: not a readable image: corrupt compressed data ({e})") from None
    if made < needed:
        raise LabelFactoryError(
            f"{name}: truncated image: its compressed data inflate to {made} bytes, its header declares {needed}; "
            "copy it again from its source"
        )


def _check_bytes(path: Path, offset: int, needed: int, name: str) -> None:
    present = os.path.getsize(path) - offset
    if present < needed:
        raise LabelFactoryError(
            f"{name}: truncated image: {max(present, 0)} bytes of voxels, its header declares {needed}; "
            "copy it again from its source"
        )


def _head_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_BYTES)


def _text_header(path: Path, name: str, magic: str) -> tuple[str, int]:
    """(header text, offset of the data after its blank line) of a text header starting with `magic`."""
    raw = _head_bytes(path)
    if not raw.startswith(magic.encode()):
        raise LabelFactoryError(f"{name}: not a readable {magic} file (no {magic} magic)")
    ends = [i for i in (raw.find(b"\n\n"), raw.find(b"\r\n\r\n")) if i >= 0]
    if not ends and len(raw) == HEADER_BYTES:
        raise LabelFactoryError(f"{name}: not a readable {magic} file (no end to its header)")
    if not ends:  # the file ends with its header: a detached one (its fields say where its data would be)
        return raw.decode("latin-1"), len(raw)
    end = min(ends)
    gap = 2 if raw[end : end + 2] == b"\n\n" else 4
    return raw[:end].decode("latin-1"), end + gap


def _x(shape: Sequence[int]) -> str:
    return " x ".join(str(s) for s in shape)


__all__ = ["check_dicom", "check_dicom_series", "check_file", "check_metaimage", "check_nrrd", "check_shape"]
