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

__all__ = ["check_structure", "MAX_JPEG_HEADER_STEPS", "MAX_JPEG_PARSED_SEGMENTS", "MAX_JPEG_SEGMENT_BYTES",
           "MAX_JPEG_SCANS", "MAX_JPEG_SCAN_MARKERS", "MAX_PNG_CHUNKS", "MAX_PNG_COMPRESSED_CHUNKS",
           "PNG_DATA_CHUNK_BYTES", "MAX_GIF_HEADER_STEPS", "MAX_TIFF_TAGS", "MAX_TIFF_TAG_VALUES", "MAX_TIFF_OFFSETS",
           "MAX_PPM_HEADER_BYTES"]

#: Markers, fill bytes and stray bytes Pillow reads before a JPEG's first scan: a camera's photo has about 15
#: markers (APPn, DQT, SOF, DHT, ...), an ICC profile split into APP2 segments a few more.
MAX_JPEG_HEADER_STEPS = 512
#: Segments whose content Pillow parses in Python, at most this many of each kind (cameras write one or two):
#: EXIF (APP1, concatenated), Photoshop resources (APP13), frame headers (SOFn, DHP), quantization tables (DQT).
MAX_JPEG_PARSED_SEGMENTS = {"EXIF": 4, "Photoshop": 8, "SOF": 4, "DQT": 16}
#: The largest frame header (6 bytes and 3 per component, at most 255) and quantization-table segment (4
#: tables of 129 bytes), with their length fields.
MAX_JPEG_SEGMENT_BYTES = {"SOF": 2 + 6 + 3 * 255, "DQT": 2 + 4 * 129}
#: Scans of a JPEG (start-of-scan markers up to its end-of-image marker): libjpeg's progressive script writes 10
#: for colour images, mozjpeg about as many; each scan is a pass over the whole image's coefficients.
MAX_JPEG_SCANS = 100
#: Markers between a JPEG's first scan and its end (scans, tables, restart-free): a few per scan.
MAX_JPEG_SCAN_MARKERS = 8 * MAX_JPEG_SCANS
#: PNG chunks other than image data and frame control (text, colour, metadata).
MAX_PNG_CHUNKS = 1024
#: Compressed text and colour-profile chunks (zTXt, iTXt, iCCP), each inflated on open.
MAX_PNG_COMPRESSED_CHUNKS = 32
#: Image-data chunks (IDAT; an animated PNG's fdAT and fcTL) of a PNG: one per this many bytes of the file, plus
#: 4 x ``MAX_PNG_CHUNKS`` (libpng writes 8 KiB chunks, Pillow 64 KiB ones; an animated sticker two per frame).
PNG_DATA_CHUNK_BYTES = 1024
#: Extension blocks, their sub-blocks and stray bytes before a GIF's first image (XMP's "magic trailer" alone is
#: 256 one-byte sub-blocks).
MAX_GIF_HEADER_STEPS = 4096
#: Tags in a TIFF's first image file directory (libtiff writes 10-30).
MAX_TIFF_TAGS = 1024
#: Values of the numeric tags Pillow decodes on open (resolution, orientation, photometric, ...): one or two
#: each; per sample (bits per sample, sample format, extra samples): at most this many; a colour map three per
#: palette entry of up to 16 bits.
MAX_TIFF_TAG_VALUES = {"single": 16, "per_sample": 1024, "colour_map": 3 * 65536}
#: Chunks of a WebP walked for its EXIF (an animated one has a chunk per frame; the EXIF chunk comes last).
MAX_WEBP_CHUNKS = 1 << 16
#: Strips or tiles of a TIFF: at most one strip per row and sample, or one 16 x 16 tile (the smallest the format
#: allows) per sample, and never more than this.
MAX_TIFF_OFFSETS = 1 << 18
#: The bytes a PPM/PGM/PBM/PFM header (magic, comments, width, height, maximum value) may take.
MAX_PPM_HEADER_BYTES = 4096
#: The largest body in a format Pillow decodes in Python, byte by byte (run-length BMP, plain-text PBM/PGM/PPM):
#: a 9.7 MB RLE8 BMP took 2.1 s (and the interpreter's lock from every request beside it), a 9.6 MB plain
#: PBM 0.45 s; real files in these formats are small.
MAX_PYTHON_DECODED_BYTES = 1 << 20

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DATA_CHUNKS = (b"IDAT", b"fdAT", b"fcTL")
_TIFF_CLASSIC = (b"MM\x00\x2a", b"II\x2a\x00", b"MM\x2a\x00", b"II\x00\x2a")
_TIFF_BIG = (b"MM\x00\x2b", b"II\x2b\x00")
#: JPEG markers whose segment Pillow reads with a length (its handler): SOFn, DHT, DAC, SOS, DQT, DNL, DRI, DHP,
#: EXP, APPn, COM. Its other known markers (RSTn, SOI, EOI, JPG, JPGn) have none.
_JPEG_WITH_LENGTH = frozenset({*range(0xC0, 0xC8), *range(0xC9, 0xD0), *range(0xDA, 0xF0), 0xFE})
_JPEG_WITHOUT_LENGTH = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
_JPEG_FRAME_HEADERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0),
                                 0xDE})
#: The next marker after entropy-coded data: a 0xFF (and fill bytes) then anything but 0x00 (a stuffed 0xFF) and
#: the restart markers, which belong to the scan.
_JPEG_NEXT_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")
#: The magic number, then width, height (and, but for bitmaps, the maximum value), with comments between.
#: Each number ends at whitespace: Pillow joins the digits around a comment into one number.
_PPM_HEADER = {tokens: re.compile(rb"P[0-9A-Za-z]+(?:(?:\s|#[^\r\n]*[\r\n])+[-+.0-9eE]+(?=\s)){%d}" % tokens)
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
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _check_webp(data)
    elif data[:1] == b"P" and len(data) > 1 and data[1:2] in b"0123456fy":  # Pillow's PPM family
        tokens = 2 if data[1:2] in (b"1", b"4") else 3
        if _PPM_HEADER[tokens].match(data[:MAX_PPM_HEADER_BYTES]) is None:
            _refuse(f"malformed PPM header: its size is not within its first {MAX_PPM_HEADER_BYTES:,} bytes")
        if data[1:2] in b"123" and len(data) > MAX_PYTHON_DECODED_BYTES:
            _refuse(f"a plain-text (ASCII) PBM/PGM/PPM over {MAX_PYTHON_DECODED_BYTES >> 20} MB: send it as PNG or "
                    "as a binary PNM (P4-P6)")
    elif data.startswith(b"BM") and len(data) >= 34:
        header_size, = struct.unpack_from("<I", data, 14)
        compression, = struct.unpack_from("<I", data, 30) if header_size >= 40 else (0,)
        if compression in (1, 2) and len(data) > MAX_PYTHON_DECODED_BYTES:  # BI_RLE8, BI_RLE4
            _refuse(f"a run-length encoded BMP over {MAX_PYTHON_DECODED_BYTES >> 20} MB: send it as PNG or as an "
                    "uncompressed BMP")


def _check_jpeg(data: bytes) -> None:
    """Pillow's header loop, step for step: after ``FF D8 FF`` it reads a byte at a time; a 0xFF then a known
    marker (its segment skipped by its length, if it has one), a further 0xFF (fill) or 0x00; anything else
    between markers is skipped one byte per step. It stops at the first scan, at the end of the data, or at a
    0xFF followed by an unknown marker (which it refuses)."""
    position, steps = 3, 0
    parsed = dict.fromkeys(MAX_JPEG_PARSED_SEGMENTS, 0)
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
            length = struct.unpack_from(">H", data, position)[0]
            if byte == 0xDA:  # start of scan: the rest is libjpeg's
                _check_jpeg_scans(data, position + length)
                return
            _count_parsed_segment(byte, data[position + 2:position + 16], length, parsed)
            position += length
        elif byte not in _JPEG_WITHOUT_LENGTH and byte != 0x00:
            return  # an unknown marker: Pillow refuses the file
        after_marker_byte = False


def _count_parsed_segment(marker: int, start: bytes, length: int, parsed: dict[str, int]) -> None:
    """Count a segment whose content Pillow parses in Python against its kind's limits."""
    if marker == 0xE1 and start.startswith(b"Exif\x00\x00"):
        kind = "EXIF"
    elif marker == 0xED and start.startswith(b"Photoshop 3.0\x00"):
        kind = "Photoshop"
    elif marker in _JPEG_FRAME_HEADERS:
        kind = "SOF"
    elif marker == 0xDB:
        kind = "DQT"
    else:
        return
    parsed[kind] += 1
    if parsed[kind] > MAX_JPEG_PARSED_SEGMENTS[kind]:
        _refuse(f"malformed JPEG: more than {MAX_JPEG_PARSED_SEGMENTS[kind]} {kind} segments")
    if length > MAX_JPEG_SEGMENT_BYTES.get(kind, length):
        _refuse(f"malformed JPEG: a {kind} segment of {length:,} bytes (at most {MAX_JPEG_SEGMENT_BYTES[kind]})")


def _check_jpeg_scans(data: bytes, position: int) -> None:
    """Count the scans from the first one's data to the end of the image, as libjpeg reads them: the next marker
    is found in C (inside entropy-coded data a 0xFF is followed by 0x00 or a restart marker), a segment with a
    length is skipped by it (a comment holding an end-of-image marker's bytes is no end), and what follows the end
    of the image (a phone's motion-photo video) is not counted."""
    scans = markers = 0
    while (found := _JPEG_NEXT_MARKER.search(data, position)) is not None:
        marker, position = found.group(1)[0], found.end()
        markers += 1
        if markers > MAX_JPEG_SCAN_MARKERS:
            _refuse(f"malformed JPEG: more than {MAX_JPEG_SCAN_MARKERS} markers between its scans")
        if marker == 0xD9:
            return
        if marker == 0xDA:
            scans += 1
            if 1 + scans > MAX_JPEG_SCANS:
                _refuse(f"malformed JPEG: more than {MAX_JPEG_SCANS} scans")
        if marker in _JPEG_WITH_LENGTH:
            if position + 2 > len(data):
                return
            position += max(2, struct.unpack_from(">H", data, position)[0])


def _check_png(data: bytes) -> None:
    position, other, image_data, compressed = len(_PNG_SIGNATURE), 0, 0, 0
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
            if kind in (b"zTXt", b"iTXt", b"iCCP"):
                compressed += 1
                if compressed > MAX_PNG_COMPRESSED_CHUNKS:
                    _refuse(f"malformed PNG: more than {MAX_PNG_COMPRESSED_CHUNKS} compressed text or profile "
                            "chunks")
            if kind == b"eXIf":
                _check_exif(data[position + 8:position + 8 + length])
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

    def block() -> int:  # one sub-block (Pillow's data()): its size, 0 for the empty one that ends a chain
        nonlocal position
        step()
        if position >= len(data):
            return 0
        size = data[position]
        position += 1 + size
        return size

    while position < len(data) and data[position] not in b",;":
        step()
        introducer, position = data[position], position + 1
        if introducer != 0x21:  # a stray byte
            continue
        label, position = (data[position] if position < len(data) else 0), position + 1
        first, start = block(), position
        if label == 0xFE:  # a comment: its sub-blocks up to the empty one
            if first:
                while block():
                    pass
            continue
        # Any other extension: Pillow reads a further chain after the first sub-block, even an empty one (and
        # one more sub-block after an application extension's NETSCAPE2.0).
        if label == 0xFF and first and data[start - first:start].startswith(b"NETSCAPE2.0"):
            block()
        while block():
            pass


#: TIFF field types Pillow keeps as bytes (BYTE, ASCII, SBYTE, UNDEFINED): no per-value Python work.
_TIFF_BYTE_TYPES = frozenset({1, 2, 6, 7})
#: The numeric tags Pillow decodes on open, by how many values they may hold (MAX_TIFF_TAG_VALUES).
_TIFF_TAGS_DECODED = {"single": (256, 257, 259, 262, 266, 274, 277, 278, 282, 283, 284, 296, 322, 323, 530),
                      "per_sample": (258, 338, 339), "colour_map": (320,)}


def _tiff_values_limit(tag: int) -> int | None:
    for kind, tags in _TIFF_TAGS_DECODED.items():
        if tag in tags:
            return MAX_TIFF_TAG_VALUES[kind]
    return None


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
        if tag in entries:  # Pillow keeps one, libtiff refuses the file
            _refuse(f"malformed TIFF: tag {tag} twice in its first directory")
        entries[tag] = (kind, count, value)
        limit = _tiff_values_limit(tag)
        if kind not in _TIFF_BYTE_TYPES and limit is not None and count > limit:
            _refuse(f"malformed TIFF: tag {tag} holds {count:,} values (at most {limit:,})")

    def number(tag: int, default: int) -> int:
        kind, count, value = entries.get(tag, (0, 0, b""))
        formats = {3: "H", 4: "I", 16: "Q"}
        if count != 1 or kind not in formats or struct.calcsize(formats[kind]) > len(value):
            return default
        return struct.unpack_from(f"{order}{formats[kind]}", value)[0]

    width, height, samples = number(256, 1), number(257, 1), max(number(277, 1), 1)
    if 273 in entries or 324 not in entries:  # StripOffsets (Pillow's choice when both are there)
        most, offsets, what = samples * max(height, 1), entries.get(273, (0, 0, b""))[1], "strips"
    else:  # TileOffsets
        most = samples * math.ceil(max(width, 1) / 16) * math.ceil(max(height, 1) / 16)
        offsets, what = entries[324][1], "tiles"
    most = min(most, MAX_TIFF_OFFSETS)
    if offsets > most:
        _refuse(f"malformed TIFF: {offsets:,} {what} for a {width}x{height} image of {samples} sample(s) "
                f"(at most {most:,})")
    _check_exif_directories(data, order, big, entries)


#: Directories an image's first one points to whose tags Pillow parses in Python when it loads the image or reads
#: its EXIF: EXIF and GPS, and the EXIF directory's Interop one.
_EXIF_POINTERS = {34665: "EXIF directory", 34853: "GPS directory"}
_INTEROP_POINTER = 40965


def _pointer(entry: tuple[int, int, bytes] | None, order: str, big: bool) -> int | None:
    """The offset a directory-pointer tag holds (a LONG or IFD value, or their 64-bit kinds in a BigTIFF)."""
    if entry is None or entry[1] != 1:
        return None
    kind, _, value = entry
    formats = {4: "I", 13: "I", 16: "Q", 18: "Q"}
    if kind not in formats or struct.calcsize(formats[kind]) > len(value):
        return None
    return struct.unpack_from(f"{order}{formats[kind]}", value)[0]


def _directory(data: bytes, offset: int, order: str, big: bool, what: str) -> dict[int, tuple[int, int, bytes]]:
    """The entries of the directory at ``offset`` (none where it lies outside ``data``: Pillow's error then),
    refused beyond :data:`MAX_TIFF_TAGS` tags."""
    count_format, entry_format, entry_size = ("Q", "HHQ8s", 20) if big else ("H", "HHI4s", 12)
    count_size = struct.calcsize(count_format)
    if offset + count_size > len(data):
        return {}
    tags = struct.unpack_from(f"{order}{count_format}", data, offset)[0]
    if tags > MAX_TIFF_TAGS:
        _refuse(f"malformed TIFF: {tags:,} tags in its {what} (at most {MAX_TIFF_TAGS})")
    entries = {}
    for index in range(tags):
        at = offset + count_size + index * entry_size
        if at + entry_size > len(data):
            break
        tag, kind, count, value = struct.unpack_from(f"{order}{entry_format}", data, at)
        entries[tag] = (kind, count, value)
    return entries


def _check_exif_directories(data: bytes, order: str, big: bool, first: dict[int, tuple[int, int, bytes]]) -> None:
    """The EXIF and GPS directories ``first`` points to, and the EXIF one's Interop directory: Pillow parses every
    tag of them when it loads the image, which the first directory's bound left unbounded (65,535 tags in an 8x8
    TIFF's EXIF directory held a decode thread for about a second)."""
    for tag, what in _EXIF_POINTERS.items():
        offset = _pointer(first.get(tag), order, big)
        if offset is None:
            continue
        entries = _directory(data, offset, order, big, what)
        if tag == 34665 and (inner := _pointer(entries.get(_INTEROP_POINTER), order, big)) is not None:
            _directory(data, inner, order, big, "Interop directory")


def _check_exif(payload: bytes) -> None:
    """An EXIF block (a PNG's eXIf chunk, a WebP's EXIF chunk: a TIFF stream without pixels): its first directory,
    which reading the orientation parses tag by tag, and the directories it points to, within
    :data:`MAX_TIFF_TAGS` tags each. A block without its TIFF header is left to Pillow (it reads as no EXIF)."""
    payload = payload.removeprefix(b"Exif\x00\x00")
    if not payload.startswith(_TIFF_CLASSIC) or len(payload) < 8:
        return
    order = "<" if payload[:2] == b"II" else ">"
    first = _directory(payload, struct.unpack_from(f"{order}I", payload, 4)[0], order, False, "EXIF block")
    _check_exif_directories(payload, order, False, first)


def _check_webp(data: bytes) -> None:
    """A WebP's EXIF chunk (:func:`_check_exif`), and at most :data:`MAX_WEBP_CHUNKS` chunks before the end (past
    them the EXIF chunk could hide from this walk)."""
    position = 12
    for _ in range(MAX_WEBP_CHUNKS):
        if position + 8 > len(data):
            return
        kind, length = struct.unpack_from("<4sI", data, position)
        if kind == b"EXIF":
            _check_exif(data[position + 8:position + 8 + length])
        position += 8 + length + (length & 1)
    if position + 8 <= len(data):
        _refuse(f"malformed WebP: more than {MAX_WEBP_CHUNKS:,} chunks")
