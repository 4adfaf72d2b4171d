"""Bounds on an uploaded image's container structure, checked before Pillow parses it.

Pillow parses image headers in Python, one iteration per structural element: per JPEG segment (and per fill
byte before a marker; its EXIF segments are concatenated quadratically), per PNG chunk (twice: on open and at
the end of the load), per GIF extension sub-block, per PPM header byte, per TIFF tag. None of this is bounded
by the pixel budget, so a 10 MB body of tiny elements held a replica's event loop for seconds to minutes
(~500,000 EXIF segments: quadratic). A progressive JPEG of thousands of scans decodes for minutes in
libjpeg (libjpeg-turbo's LJT-01-003) from a small file, in a decode thread nothing can cancel.

:func:`check_structure` walks the structure with C-speed scans and a bounded number of Python steps, and
refuses (:class:`~pipelines.preprocess.ImageDecodeError`) what no real encoder writes; the limits are far above
what cameras, browsers, libjpeg, libpng, giflib and libtiff produce. Bytes it does not recognise are left to
Pillow, whose own errors apply.
"""

from __future__ import annotations

import re
import struct

__all__ = ["check_structure", "MAX_JPEG_SEGMENTS", "MAX_JPEG_FILL_BYTES", "MAX_JPEG_SCANS", "MAX_PNG_CHUNKS",
           "PNG_DATA_CHUNK_BYTES", "MAX_GIF_SUB_BLOCKS", "MAX_TIFF_TAGS", "MAX_PPM_HEADER_BYTES"]

#: Segments before a JPEG's first scan: a camera's photo has about 15 (APPn, DQT, SOF, DHT, ...), an ICC profile
#: split into APP2 segments a few more.
MAX_JPEG_SEGMENTS = 256
#: Fill (0xFF) or stray bytes before one JPEG marker (the standard allows fill bytes; encoders write none).
MAX_JPEG_FILL_BYTES = 64
#: Scans (start-of-scan markers) in a JPEG: libjpeg's progressive script writes 10 for colour images, mozjpeg
#: about as many; each scan is a pass over the whole image's coefficients.
MAX_JPEG_SCANS = 100
#: PNG chunks other than image data (IDAT, APNG's fdAT): text, colour and animation-control chunks.
MAX_PNG_CHUNKS = 1024
#: Image-data chunks (IDAT, fdAT) of a PNG: one per this many bytes of the file, plus ``MAX_PNG_CHUNKS`` (libpng
#: writes 8 KiB chunks, Pillow 64 KiB ones).
PNG_DATA_CHUNK_BYTES = 1024
#: Extension sub-blocks before a GIF's first image (XMP's "magic trailer" alone is 256 one-byte sub-blocks).
MAX_GIF_SUB_BLOCKS = 4096
#: Tags in a TIFF's first image file directory (libtiff writes 10-30).
MAX_TIFF_TAGS = 1024
#: The bytes a PPM/PGM/PBM header (magic, comments, width, height, maximum value) may take.
MAX_PPM_HEADER_BYTES = 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DATA_CHUNKS = (b"IDAT", b"fdAT")
_JPEG_GAP = re.compile(rb"[^\xff]*\xff+")  # stray bytes, then the fill bytes and the 0xFF of the next marker
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length: TEM, RST0-7
#: The magic number, then width, height (and, but for bitmaps, the maximum value), with comments between.
_PPM_HEADER = {tokens: re.compile(rb"P[0-9A-Za-z]+(?:(?:\s|#[^\r\n]*[\r\n])+[-+.0-9eE]+){%d}" % tokens)
               for tokens in (2, 3)}


def _refuse(message: str) -> None:
    from .preprocess import ImageDecodeError  # preprocess imports this module

    raise ImageDecodeError(message)


def check_structure(data: bytes) -> None:
    """Refuse image bytes whose container holds more structural elements than any real encoder writes (see the
    module's limits), in time bounded by the limits, not by the body's size."""
    if data.startswith(b"\xff\xd8"):
        _check_jpeg(data)
    elif data.startswith(_PNG_SIGNATURE):
        _check_png(data)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _check_gif(data)
    elif data.startswith((b"II*\x00", b"MM\x00*")):
        _check_tiff(data)
    elif data[:1] == b"P" and len(data) > 1 and data[1:2] in b"0123456fy":  # Pillow's PPM family
        tokens = 2 if data[1:2] in (b"1", b"4") else 3
        if _PPM_HEADER[tokens].match(data[:MAX_PPM_HEADER_BYTES]) is None:
            _refuse(f"malformed PPM header: its size is not within its first {MAX_PPM_HEADER_BYTES:,} bytes")


def _check_jpeg(data: bytes) -> None:
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS:  # inside entropy-coded data 0xFF is always followed by 0x00
        _refuse(f"malformed JPEG: more than {MAX_JPEG_SCANS} scans")
    position, segments = 2, 0
    while position < len(data):
        gap = _JPEG_GAP.match(data, position)
        if gap is None:  # no marker after this point: Pillow reports the truncation
            return
        if gap.end() - position - 1 > MAX_JPEG_FILL_BYTES:
            _refuse(f"malformed JPEG: more than {MAX_JPEG_FILL_BYTES} fill or stray bytes before a marker")
        if gap.end() >= len(data):
            return
        marker, position = data[gap.end()], gap.end() + 1
        if marker == 0xDA or marker == 0xD9:  # start of scan (the rest is libjpeg's) or end of image
            return
        if marker in _JPEG_STANDALONE:
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            _refuse(f"malformed JPEG: more than {MAX_JPEG_SEGMENTS} segments before its image data")
        if position + 2 > len(data):
            return
        position += struct.unpack_from(">H", data, position)[0]


def _check_png(data: bytes) -> None:
    position, other, image_data = len(_PNG_SIGNATURE), 0, 0
    data_limit = MAX_PNG_CHUNKS + len(data) // PNG_DATA_CHUNK_BYTES
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
    if len(data) < 13:
        return
    position = 13 + (3 << ((data[10] & 0x07) + 1) if data[10] & 0x80 else 0)  # after the global colour table
    sub_blocks = 0
    while position < len(data) and data[position] == 0x21:  # extensions before the first image descriptor
        position += 2  # the introducer and the label
        while position < len(data):
            size = data[position]
            position += 1 + size
            if size == 0:
                break
            sub_blocks += 1
            if sub_blocks > MAX_GIF_SUB_BLOCKS:
                _refuse(f"malformed GIF: more than {MAX_GIF_SUB_BLOCKS} extension blocks before its first image")


def _check_tiff(data: bytes) -> None:
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return
    directory = struct.unpack_from(f"{order}I", data, 4)[0]
    if directory + 2 > len(data):
        return
    tags = struct.unpack_from(f"{order}H", data, directory)[0]
    if tags > MAX_TIFF_TAGS:
        _refuse(f"malformed TIFF: {tags:,} tags in its first directory (at most {MAX_TIFF_TAGS})")
