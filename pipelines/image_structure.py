"""Bounds on an uploaded image's container structure, checked before Pillow parses it.

Pillow parses image headers in Python, one loop iteration per structural element: per JPEG marker and per
stray or fill byte around them (its EXIF segments are concatenated, quadratically in their number), per PNG
chunk (twice: on open and at the end of the load), per GIF extension block and per stray byte between them,
per TIFF tag and per strip or tile, per PPM header byte. None of this is bounded by the pixel budget, so a
10 MB body of tiny elements held a replica's event loop for seconds to minutes (~500,000 EXIF segments:
quadratic). A progressive JPEG of thousands of scans decodes for minutes in libjpeg (libjpeg-turbo's
LJT-01-003) from a small file, in a decode thread nothing can cancel.

:func:`check_structure` walks the structure as Pillow will, with a bounded number of Python steps, and refuses
(:class:`~pipelines.preprocess.ImageDecodeError`) what no real encoder writes; the limits are far above what
cameras, phones, browsers, libjpeg, libpng, giflib and libtiff produce. A structure Pillow itself will refuse
(a missing marker, a truncated chunk) is left to Pillow, whose errors apply.
"""

from __future__ import annotations

import math
import re
import struct

__all__ = ["check_structure", "MAX_JPEG_HEADER_STEPS", "MAX_JPEG_EXIF_SEGMENTS", "MAX_JPEG_SCANS",
           "MAX_PNG_CHUNKS", "PNG_DATA_CHUNK_BYTES", "MAX_GIF_HEADER_STEPS", "MAX_TIFF_TAGS", "MAX_TIFF_OFFSETS",
           "MAX_PPM_HEADER_BYTES"]

#: Markers, fill bytes and stray bytes Pillow reads before a JPEG's first scan: a camera's photo has about 15
#: markers (APPn, DQT, SOF, DHT, ...), an ICC profile split into APP2 segments a few more.
MAX_JPEG_HEADER_STEPS = 512
#: EXIF segments (APP1 "Exif"), which Pillow concatenates: cameras write one.
MAX_JPEG_EXIF_SEGMENTS = 16
#: Scans of a JPEG (start-of-scan markers up to its end-of-image marker): libjpeg's progressive script writes 10
#: for colour images, mozjpeg about as many; each scan is a pass over the whole image's coefficients.
MAX_JPEG_SCANS = 100
#: PNG chunks other than image data and frame control (text, colour, metadata).
MAX_PNG_CHUNKS = 1024
#: Image-data chunks (IDAT; an animated PNG's fdAT and fcTL) of a PNG: one per this many bytes of the file, plus
#: 4 x ``MAX_PNG_CHUNKS`` (libpng writes 8 KiB chunks, Pillow 64 KiB ones; an animated sticker two per frame).
PNG_DATA_CHUNK_BYTES = 1024
#: Extension blocks, their sub-blocks and stray bytes before a GIF's first image (XMP's "magic trailer" alone is
#: 256 one-byte sub-blocks).
MAX_GIF_HEADER_STEPS = 4096
#: Tags in a TIFF's first image file directory (libtiff writes 10-30).
MAX_TIFF_TAGS = 1024
#: Strips or tiles of a TIFF: at most one strip per row and sample, or one 16 x 16 tile (the smallest the format
#: allows) per sample, and never more than this.
MAX_TIFF_OFFSETS = 1 << 18
#: The bytes a PPM/PGM/PBM/PFM header (magic, comments, width, height, maximum value) may take.
MAX_PPM_HEADER_BYTES = 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DATA_CHUNKS = (b"IDAT", b"fdAT", b"fcTL")
_TIFF_CLASSIC = (b"MM\x00\x2a", b"II\x2a\x00", b"MM\x2a\x00", b"II\x00\x2a")
_TIFF_BIG = (b"MM\x00\x2b", b"II\x2b\x00")
#: JPEG markers whose segment Pillow reads with a length (its handler): SOFn, DHT, DAC, SOS, DQT, DNL, DRI, DHP,
#: EXP, APPn, COM. Its other known markers (RSTn, SOI, EOI, JPG, JPGn) have none.
_JPEG_WITH_LENGTH = frozenset({*range(0xC0, 0xC8), *range(0xC9, 0xD0), *range(0xDA, 0xF0), 0xFE})
_JPEG_WITHOUT_LENGTH = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
#: The magic number, then width, height (and, but for bitmaps, the maximum value), with comments between.
_PPM_HEADER = {tokens: re.compile(rb"P[0-9A-Za-z]+(?:(?:\s|#[^\r\n]*[\r\n])+[-+.0-9eE]+){%d}" % tokens)
               for tokens in (2, 3)}


def _refuse(message: str) -> None:
    from .preprocess import ImageDecodeError  # preprocess imports this module

    raise ImageDecodeError(message)


def check_structure(data: bytes) -> None:
    """Refuse image bytes whose container holds more structural elements than any real encoder writes (see the
    module's limits), in time bounded by the limits, not by the body's size."""
    if data.startswith(b"\xff\xd8\xff"):
        _check_jpeg(data)
    elif data.startswith(_PNG_SIGNATURE):
        _check_png(data)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _check_gif(data)
    elif data.startswith(_TIFF_CLASSIC + _TIFF_BIG):
        _check_tiff(data)
    elif data[:1] == b"P" and len(data) > 1 and data[1:2] in b"0123456fy":  # Pillow's PPM family
        tokens = 2 if data[1:2] in (b"1", b"4") else 3
        if _PPM_HEADER[tokens].match(data[:MAX_PPM_HEADER_BYTES]) is None:
            _refuse(f"malformed PPM header: its size is not within its first {MAX_PPM_HEADER_BYTES:,} bytes")


def _check_jpeg(data: bytes) -> None:
    """Pillow's header loop, step for step: after ``FF D8 FF`` it reads a byte at a time; a 0xFF then a known
    marker (its segment skipped by its length, if it has one), a further 0xFF (fill) or 0x00; anything else
    between markers is skipped one byte per step. It stops at the first scan, at the end of the data, or at a
    0xFF followed by an unknown marker (which it refuses)."""
    position, steps, exif = 3, 0, 0
    after_marker_byte = True  # Pillow holds the 0xFF that precedes the next marker byte
    while position < len(data):
        steps += 1
        if steps > MAX_JPEG_HEADER_STEPS:
            _refuse(f"malformed JPEG: more than {MAX_JPEG_HEADER_STEPS} markers, fill or stray bytes before its "
                    "image data")
        byte = data[position]
        position += 1
        if not after_marker_byte:  # the byte after a segment or a stray byte: a marker starts with 0xFF
            after_marker_byte = byte == 0xFF
            continue
        if byte == 0xFF:  # a fill byte: the next byte is the marker
            continue
        if byte in _JPEG_WITH_LENGTH:
            if position + 2 > len(data):
                return
            if byte == 0xDA:  # start of scan: the rest is libjpeg's
                _check_jpeg_scans(data, position)
                return
            if byte == 0xE1 and data[position + 2:position + 8] == b"Exif\x00\x00":
                exif += 1
                if exif > MAX_JPEG_EXIF_SEGMENTS:
                    _refuse(f"malformed JPEG: more than {MAX_JPEG_EXIF_SEGMENTS} EXIF segments")
            position += struct.unpack_from(">H", data, position)[0]
        elif byte not in _JPEG_WITHOUT_LENGTH and byte != 0x00:
            return  # an unknown marker: Pillow refuses the file
        after_marker_byte = False


def _check_jpeg_scans(data: bytes, first_scan: int) -> None:
    # Inside entropy-coded data a 0xFF is always followed by 0x00 or a restart marker, so neither marker below
    # occurs there by chance; what follows the end of the image (a phone's motion-photo video) is not counted.
    end = data.find(b"\xff\xd9", first_scan)
    scans = 1 + data.count(b"\xff\xda", first_scan, end if end >= 0 else len(data))
    if scans > MAX_JPEG_SCANS:
        _refuse(f"malformed JPEG: more than {MAX_JPEG_SCANS} scans")


def _check_png(data: bytes) -> None:
    position, other, image_data = len(_PNG_SIGNATURE), 0, 0
    data_limit = 4 * MAX_PNG_CHUNKS + len(data) // PNG_DATA_CHUNK_BYTES
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind in _PNG_DATA_CHUNKS:
            image_data += 1
            if image_data > data_limit:
                _refuse(f"malformed PNG: more than {data_limit:,} image-data chunks in {len(data):,} bytes")
        else:
            other += 1
            if other > MAX_PNG_CHUNKS:
                _refuse(f"malformed PNG: more than {MAX_PNG_CHUNKS} chunks besides its image data")
            if kind == b"IEND":
                return
        position += 12 + length


def _check_gif(data: bytes) -> None:
    """Pillow's first-frame loop: a byte at a time, an extension (``!``, a label, sub-blocks up to an empty one)
    or stray bytes, until the first image descriptor (``,``) or the trailer (``;``)."""
    if len(data) < 13:
        return
    position = 13 + (3 << ((data[10] & 0x07) + 1) if data[10] & 0x80 else 0)  # after the global colour table
    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1
        if steps > MAX_GIF_HEADER_STEPS:
            _refuse(f"malformed GIF: more than {MAX_GIF_HEADER_STEPS} extension blocks or stray bytes before its "
                    "first image")

    while position < len(data) and data[position] not in b",;":
        step()
        introducer, position = data[position], position + 1
        if introducer != 0x21:  # a stray byte
            continue
        position += 1  # the label
        while position < len(data):
            step()
            size = data[position]
            position += 1 + size
            if size == 0:
                break


def _check_tiff(data: bytes) -> None:
    """The first image file directory (all Pillow reads on open): its tag count, and its strips or tiles, each
    one step of Pillow's set-up, against the image's size."""
    order = "<" if data[:2] == b"II" else ">"
    big = data.startswith(_TIFF_BIG)
    count_format, entry_format, entry_size = ("Q", "HHQ8s", 20) if big else ("H", "HHI4s", 12)
    offset_at = 8 if big else 4
    if len(data) < offset_at + (8 if big else 4):
        return
    directory = struct.unpack_from(f"{order}{'Q' if big else 'I'}", data, offset_at)[0]
    count_size = struct.calcsize(count_format)
    if directory + count_size > len(data):
        return
    tags = struct.unpack_from(f"{order}{count_format}", data, directory)[0]
    if tags > MAX_TIFF_TAGS:
        _refuse(f"malformed TIFF: {tags:,} tags in its first directory (at most {MAX_TIFF_TAGS})")
    entries: dict[int, tuple[int, int, bytes]] = {}
    for index in range(tags):
        at = directory + count_size + index * entry_size
        if at + entry_size > len(data):
            break
        tag, kind, count, value = struct.unpack_from(f"{order}{entry_format}", data, at)
        entries[tag] = (kind, count, value)

    def number(tag: int, default: int) -> int:
        kind, count, value = entries.get(tag, (0, 0, b""))
        formats = {3: "H", 4: "I", 16: "Q"}
        if count != 1 or kind not in formats or struct.calcsize(formats[kind]) > len(value):
            return default
        return struct.unpack_from(f"{order}{formats[kind]}", value)[0]

    width, height, samples = number(256, 1), number(257, 1), max(number(277, 1), 1)
    if 324 in entries:  # TileOffsets
        most = samples * math.ceil(max(width, 1) / 16) * math.ceil(max(height, 1) / 16)
        offsets, what = entries[324][1], "tiles"
    else:  # StripOffsets
        most, offsets, what = samples * max(height, 1), entries.get(273, (0, 0, b""))[1], "strips"
    most = min(most, MAX_TIFF_OFFSETS)
    if offsets > most:
        _refuse(f"malformed TIFF: {offsets:,} {what} for a {width}x{height} image of {samples} sample(s) "
                f"(at most {most:,})")
