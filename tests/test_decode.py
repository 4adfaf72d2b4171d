"""Decoding uploads: the budget is checked from the header before any pixel is decoded, only the accepted
formats are opened, and every failure is an ImageDecodeError (415's subclass for a refused format)."""

from __future__ import annotations

import functools
import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.preprocess import (
    ACCEPTED_FORMATS,
    DecodeBudget,
    ImageDecodeError,
    PreprocessSpec,
    UnsupportedImageFormat,
    check_image_header,
    decode_cost,
    decode_image,
    open_image,
    preprocess_upload,
)

SPEC = PreprocessSpec(image_size=16, channels=1, mean=(0.5,), std=(0.25,), class_names=tuple("abc"))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_budget_limits_pixels_aspect_ratio_and_the_resized_image():
    budget = DecodeBudget(max_pixels=1_000_000, max_aspect_ratio=20, max_resized_pixels=16 * 32)
    budget.check(1000, 1000, 16)
    budget.check(32, 16, 16)  # 2:1 resizes to 32x16, exactly the limit
    budget.check(320, 16, 16)  # 20:1 is resized straight to the 16x16 square the crop keeps
    with pytest.raises(ImageDecodeError, match="above the limit of 1,000,000"):
        budget.check(1001, 1000, 16)
    with pytest.raises(ImageDecodeError, match="aspect ratio above the limit of 20"):
        budget.check(1_000_000, 1, 16)
    with pytest.raises(ImageDecodeError, match="resizes to 512 pixels for a 16-pixel model"):
        DecodeBudget(max_resized_pixels=500).check(32, 16, 16)
    # A panorama for a 600-pixel model (EfficientNet-B7): 360,000 pixels once resized, not a 600x7200 strip.
    DecodeBudget(max_resized_pixels=1_000_000).check(7200, 600, 600)
    with pytest.raises(ImageDecodeError, match="no pixels"):
        budget.check(0, 5, 16)


def test_an_aspect_ratio_bomb_is_refused_from_its_header_before_decoding():
    bomb = encode(Image.new("L", (4_000_000, 1)), "PNG")
    assert len(bomb) < 10_000
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="aspect ratio"):
        preprocess_upload(bomb, SPEC, DecodeBudget())
    # The header alone decides: a copy with its pixel data cut off fails the same way, not as "truncated".
    with pytest.raises(ImageDecodeError, match="aspect ratio"):
        preprocess_upload(bomb[:100], SPEC, DecodeBudget())
    assert time.perf_counter() - started < 1.0


def test_the_server_accepts_every_format_an_image_folder_trains_on(tmp_path):
    """A model trained on .pgm faces refused the same file at serving time (415)."""
    from pipelines.data import IMAGE_EXTENSIONS

    for extension in IMAGE_EXTENSIONS:
        Image.new("L", (8, 8), 128).save(tmp_path / f"face{extension}")
        assert open_image((tmp_path / f"face{extension}").read_bytes()).size == (8, 8), extension


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_every_accepted_format_decodes_to_the_training_pixels(fmt):
    array = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    data = encode(Image.fromarray(array), fmt)
    expected = SPEC.tensor_from_image(Image.open(io.BytesIO(data)))
    assert preprocess_upload(data, SPEC, DecodeBudget()).equal(expected)


def test_formats_pillow_knows_but_the_server_does_not_accept_are_415_and_never_opened():
    eps = encode(Image.new("RGB", (8, 8)), "EPS")
    with pytest.raises(UnsupportedImageFormat, match="EPS images are not accepted"):
        preprocess_upload(eps, SPEC, DecodeBudget())
    with pytest.raises(UnsupportedImageFormat):
        decode_image(eps, 1000)
    for garbage in (b"%PDF-1.4 hello", b"definitely not an image"):  # no format at all: plain 400
        with pytest.raises(ImageDecodeError, match="not a readable image") as caught:
            preprocess_upload(garbage, SPEC, DecodeBudget())
        assert not isinstance(caught.value, UnsupportedImageFormat)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _tiff_with_strips(strips: int, big: bool = False, extra: tuple = ()) -> bytes:
    """An 8 x 8 grey TIFF whose first directory lists ``strips`` strip offsets (BigTIFF with ``big``), and the
    ``extra`` entries (tag, type, count, value)."""
    import struct

    count, entry, head = ("Q", "HHQQ", b"II\x2b\x00\x08\x00\x00\x00") if big else ("H", "HHII", b"II*\x00")
    first = 16 if big else 8
    tags = [(256, 3, 1, 8), (257, 3, 1, 8), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (277, 3, 1, 1),
            (278, 3, 1, 1)]
    directory_size = struct.calcsize(f"<{count}") + (len(tags) + 2 + len(extra)) * struct.calcsize(f"<{entry}") + 8
    offsets_at = first + directory_size
    long_kind = 16 if big else 4
    value = "Q" if big else "I"
    tags += [(273, long_kind, strips, offsets_at), (279, long_kind, strips, offsets_at), *extra]
    directory = struct.pack(f"<{count}", len(tags)) + b"".join(struct.pack(f"<{entry}", *t) for t in tags)
    header = head + struct.pack(f"<{value}", first)
    return header + directory + bytes(8) + struct.pack(f"<{strips}{value}", *([offsets_at] * strips))


def _exif_block(tags: int, pointer: int | None = None) -> bytes:
    """An EXIF block (a TIFF stream without pixels) whose first directory holds ``tags`` SHORT tags; with
    ``pointer`` (34665: EXIF, 34853: GPS), a first directory of that one tag pointing to a directory of them."""
    import struct

    def directory(count: int) -> bytes:
        return struct.pack("<H", count) + b"".join(struct.pack("<HHIHH", 1 + i, 3, 1, i, 0) for i in range(count)) \
            + struct.pack("<I", 0)

    if pointer is None:
        return b"II*\x00" + struct.pack("<I", 8) + directory(tags)
    first = struct.pack("<H", 1) + struct.pack("<HHII", pointer, 4, 1, 8 + 2 + 12 + 4) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + first + directory(tags)


def _tiff_pointing_to(pointer: int, tags: int) -> bytes:
    """An 8 x 8 grey TIFF whose first directory points (tag ``pointer``) to a directory of ``tags`` tags."""
    import struct

    placeholder = _tiff_with_strips(8, extra=((pointer, 4, 1, 0),))
    base = _tiff_with_strips(8, extra=((pointer, 4, 1, len(placeholder)),))
    return base + struct.pack("<H", tags) + b"".join(struct.pack("<HHIHH", 1 + i, 3, 1, i, 0)
                                                     for i in range(tags)) + struct.pack("<I", 0)


@functools.cache
def _structure_bombs() -> dict[str, bytes]:
    """1 MB bodies of tiny structural elements or stray bytes, each walked by Pillow one Python step per element
    (seconds per 10 MB body, a minute for the EXIF segments: quadratic), and a small JPEG of 200 scans."""
    import struct

    size = 1024 * 1024
    jpeg, png, gif = (encode(Image.new("RGB", (8, 8)), fmt) for fmt in ("JPEG", "PNG", "GIF"))
    exif = b"\xff\xe1" + struct.pack(">H", 18) + b"Exif\x00\x00" + bytes(10)
    progressive = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(progressive, "JPEG", progressive=True)
    progressive = progressive.getvalue()
    last_scan = progressive[progressive.rfind(b"\xff\xda"):-2]
    tiff = bytearray(encode(Image.new("L", (8, 8)), "TIFF"))
    first_directory = struct.unpack_from("<I", tiff, 4)[0]
    first_block = 13 + (3 << ((gif[10] & 0x07) + 1))  # after the header and the global colour table
    return {
        "jpeg_exif_segments": jpeg[:2] + exif * (size // len(exif)) + jpeg[2:],
        "jpeg_fill_bytes": jpeg[:2] + b"\xff" * size + jpeg[2:],
        "jpeg_restart_markers": jpeg[:2] + b"\xff\xd0" * (size // 2) + jpeg[2:],
        "jpeg_after_its_end": b"\xff\xd8\xff\xd9" + bytes(size),
        "jpeg_unlengthed_markers": jpeg[:2] + (b"\xff\xf0\xff\xff" + bytes(4096)) * (size // 4100) + jpeg[2:],
        "jpeg_scans": progressive[:-2] + last_scan * 200 + b"\xff\xd9",
        "png_chunks": png[:33] + _png_chunk(b"abCd", b"") * (size // 12) + png[33:],
        "png_data_chunks": png[:33] + _png_chunk(b"IDAT", b"") * (size // 12) + png[33:],
        "gif_extension_blocks": gif[:first_block] + b"\x21\xfe" + b"\x01c" * (size // 2) + b"\x00" + gif[first_block:],
        "gif_empty_extensions": gif[:first_block] + b"\x21\xfe\x00" * (size // 3) + gif[first_block:],
        "gif_stray_bytes": gif[:first_block] + bytes(size) + gif[first_block:],
        "ppm_header": b"P5" + b" " * size + b"8 8 255\n" + bytes(64),
        "tiff_tags": bytes(tiff[:first_directory]) + struct.pack("<H", 5000) + bytes(12 * 5000 + 4),
        "tiff_strips": _tiff_with_strips(size // 8),
        "bigtiff_strips": _tiff_with_strips(size // 16, big=True),
        "tiff_strips_beside_tiles": _tiff_with_strips(size // 8, extra=((324, 4, 1, 8),)),
        "tiff_tag_twice": _tiff_with_strips(8, extra=((273, 4, 1, 8),)),
        "tiff_resolution_values": _tiff_with_strips(8, extra=((282, 5, size // 8, 8),)),
        # After an empty first sub-block Pillow reads one more chain: here one whose first size byte is a ","
        "gif_extension_after_an_empty_block": (gif[:first_block] + b"\x21\xf9\x00\x2c" + bytes(44)
                                               + b"\x01A" * (size // 2) + b"\x00" + gif[first_block:]),
        "jpeg_comment_hiding_scans": (progressive[:-2] + b"\xff\xfe\x00\x04\xff\xd9" + last_scan * 200
                                      + b"\xff\xd9"),
        "jpeg_frame_headers": jpeg[:2] + (b"\xff\xc0\x00\x11" + bytes(15)) * 8 + jpeg[2:],
        "ppm_comment_in_a_number": b"P5 1#\n2#\n3#" + b"c" * size + b"\n255\n" + bytes(64),
        # Directories Pillow parses tag by tag when it loads the image or reads its orientation (a second each).
        "tiff_exif_directory": _tiff_pointing_to(34665, 65535),
        "tiff_gps_directory": _tiff_pointing_to(34853, 65535),
        "png_exif_block": png[:33] + _png_chunk(b"eXIf", _exif_block(65535)) + png[33:],
        "png_exif_directory": png[:33] + _png_chunk(b"eXIf", _exif_block(65535, pointer=34665)) + png[33:],
        "webp_exif_block": _webp_with_exif(_exif_block(65535)),
        "webp_chunks_hiding_exif": _webp_with_exif(_exif_block(65535), padding=70_000),
    }


def _webp_with_exif(exif: bytes, padding: int = 0) -> bytes:
    """An 8 x 8 WebP with ``exif``, after ``padding`` empty chunks of no kind Pillow knows."""
    import struct

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "WEBP", exif=exif)
    data = buffer.getvalue()
    exif_at = data.index(b"EXIF", 12)
    data = data[:exif_at] + b"JUNK\x00\x00\x00\x00" * padding + data[exif_at:]
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]


@pytest.mark.parametrize("kind", [
    "jpeg_exif_segments", "jpeg_fill_bytes", "jpeg_restart_markers", "jpeg_after_its_end", "jpeg_unlengthed_markers",
    "jpeg_scans", "jpeg_comment_hiding_scans", "jpeg_frame_headers", "png_chunks", "png_data_chunks",
    "gif_extension_blocks", "gif_empty_extensions", "gif_extension_after_an_empty_block", "gif_stray_bytes",
    "ppm_header", "ppm_comment_in_a_number", "tiff_tags", "tiff_strips", "bigtiff_strips", "tiff_strips_beside_tiles",
    "tiff_tag_twice", "tiff_resolution_values", "tiff_exif_directory", "tiff_gps_directory", "png_exif_block",
    "png_exif_directory", "webp_exif_block", "webp_chunks_hiding_exif"])
def test_containers_no_encoder_writes_are_refused_before_pillow_parses_them(kind):
    """Pillow's header parse runs in Python per structural element (on a replica's event loop) and a JPEG's scans
    each cost a pass over the image: an upload of thousands of tiny elements or stray bytes is refused from a
    bounded walk that follows Pillow's own."""
    data = _structure_bombs()[kind]
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="malformed"):
        preprocess_upload(data, SPEC, DecodeBudget())
    assert time.perf_counter() - started < 0.5


def test_real_encoders_containers_are_within_the_structure_bounds():
    """What cameras, phones and libraries write: a progressive JPEG with EXIF and an ICC profile, a JPEG with an
    EXIF thumbnail, a motion photo, an interlaced PNG with text chunks, an animated PNG, an animated GIF with a
    comment, multi-strip TIFF and BigTIFF, PGM and PFM with comments, a PBM."""
    from PIL import ImageCms

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "camera maker"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    jpeg, png, gif, tiff = io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO()
    photo.save(jpeg, "JPEG", progressive=True, exif=exif, icc_profile=icc, quality=85)
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    for i in range(50):
        text.add_text(f"key{i}", "value " * 20)
    photo.save(png, "PNG", interlace=1, pnginfo=text)
    frames = [photo.convert("P").rotate(angle) for angle in (0, 90, 180)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], comment=b"made by a test", loop=0)
    photo.save(tiff, "TIFF", strip_size=4096)
    pgm = b"P5\n# a comment, as GIMP writes\n400 300\n255\n" + bytes(400 * 300)
    pbm = b"P4\n400 300\n" + bytes(50 * 300)
    pfm = b"Pf\n# a comment\n40 30\n-1.0\n" + bytes(4 * 40 * 30)
    big_tiff = io.BytesIO()
    photo.convert("L").save(big_tiff, "TIFF", big_tiff=True, strip_size=400)
    # An animated PNG of 1,100 frames (a frame-control chunk each), as Pillow and browsers' encoders write them.
    animated = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), (i % 256, 0, 0)) for i in range(1100)]
    frames[0].save(animated, "PNG", save_all=True, append_images=frames[1:])
    # A camera JPEG's EXIF thumbnail (a whole JPEG inside APP1, its markers included) and a phone's motion photo
    # (a video appended after the end of the image, whose bytes hold start-of-scan markers by chance).
    thumbnail = encode(Image.new("RGB", (16, 16), (200, 10, 10)), "JPEG")
    app1 = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + bytes(6) + thumbnail  # an empty IFD0, then the thumbnail
    baseline = encode(photo, "JPEG")
    with_thumbnail = baseline[:2] + b"\xff\xe1" + len(app1 + b"..").to_bytes(2, "big") + app1 + baseline[2:]
    motion_photo = baseline + b"\x00\x00\x00\x18ftypmp42" + b"\xff\xda\x12\x34" * 300
    for data in (jpeg.getvalue(), png.getvalue(), gif.getvalue(), tiff.getvalue(), pgm, pbm, pfm,
                 big_tiff.getvalue(), animated.getvalue(), with_thumbnail, motion_photo):
        assert preprocess_upload(data, SPEC, DecodeBudget()).shape == (1, 1, 16, 16)


def test_a_lab_tiff_is_converted_through_rgb_for_grey_and_colour_models():
    """Pillow converts LAB to RGB but not to L: grey-scale models get the RGB image's grey."""
    lab = Image.new("LAB", (8, 8), (128, 200, 128))
    data = encode(lab, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    grey = PreprocessSpec(image_size=8, channels=1, mean=(0.0,), std=(1.0,), class_names=("a", "b"))
    colour = PreprocessSpec(image_size=8, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3, class_names=("a", "b"))
    expected_grey = lab.convert("RGB").convert("L").getpixel((0, 0)) / 255
    assert preprocess_upload(data, grey, DecodeBudget())[0, 0].flatten().tolist() == pytest.approx([expected_grey] * 64)
    red, green, blue = (c / 255 for c in lab.convert("RGB").getpixel((0, 0)))
    rgb = preprocess_upload(data, colour, DecodeBudget())[0]
    assert rgb[:, 0, 0].tolist() == pytest.approx([red, green, blue])


MEMORY_PROBE = """
import io, sys
from PIL import Image
from pipelines.preprocess import DecodeBudget, PreprocessSpec, preprocess_upload

spec = PreprocessSpec(image_size=224, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=("a", "b"))
small = io.BytesIO()
Image.new("RGB", (8, 8)).save(small, format="PNG")
preprocess_upload(small.getvalue(), spec, DecodeBudget())  # imports and first-call allocations
data = open(sys.argv[1], "rb").read()


def peak_kb():
    # This process image's own high-water mark (getrusage's ru_maxrss starts at the parent's RSS at fork,
    # which in a pytest process that has run Ray hides the peak measured here).
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


training = sys.argv[2:] == ["training"]  # the training path: no upload budget, the file as it is
image = Image.open(io.BytesIO(data)) if training else None
before = peak_kb()  # a high-water mark: nothing large before this
if training:
    spec.image_to_uint8(image)
else:
    preprocess_upload(data, spec, DecodeBudget())
print((peak_kb() - before) / 1024)
"""


def peak_mb_converting(upload: Path, *path: str) -> float:
    """The probe's peak RSS over its baseline while it converts ``upload`` (in a subprocess of its own)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(upload), *path], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


@pytest.mark.parametrize(("kind", "side", "decoded_mb", "limit_mb"), [
    # 16-bit counts 1.5x in the budget: at 6320 px (40 M pixels, 78 KB as a PNG) it took 1,066 MB over the
    # baseline through float64 copies, 225 MB since; the largest the budget admits:
    ("16-bit", 5160, 50, 200),
    ("RGBA", 4000, 64, 160),  # 62 KB as a PNG; 305 MB through full-size alpha compositing
])
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from Linux's /proc")
def test_a_small_upload_of_a_large_image_costs_little_more_than_its_pixels(tmp_path, kind, side, decoded_mb,
                                                                           limit_mb):
    """Within the default budget (40 M pixels), a few KB can decode into a large image; converting it to the
    model input must not multiply that by copies at full size (a replica decodes several at once)."""
    pixels = np.zeros((side, side), np.uint16) if kind == "16-bit" else np.zeros((side, side, 4), np.uint8)
    upload = tmp_path / "upload.png"
    Image.fromarray(pixels).save(upload)  # made here: the probe's own peak is the conversion's
    assert upload.stat().st_size < 100_000
    peak_mb = peak_mb_converting(upload)
    # At least the decoded pixels (the probe sees the conversion), at most a few times them.
    assert decoded_mb - 1 <= peak_mb <= limit_mb, f"{kind}: {peak_mb:.1f} MB over the baseline"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from Linux's /proc")
def test_a_long_strip_in_training_data_is_resized_straight_to_the_square_the_crop_keeps(tmp_path):
    """Training has no upload budget: a 40000x16 strip (1.9 MB of pixels) resized for a 224-pixel model went
    through a 560000x224 image first: 532 MB over the baseline."""
    strip = tmp_path / "strip.png"
    Image.new("RGB", (40_000, 16)).save(strip)
    assert peak_mb_converting(strip, "training") < 30


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos", "nearest"])
def test_long_images_get_torchvisions_resize_and_centre_crop_up_to_rounding(interpolation):
    """The shortcut for images over 2:1 gives the pixels torchvision's resize and centre crop give; images up to
    2:1 take torchvision's own path."""
    import torchvision.transforms.v2.functional as TF  # noqa: N812

    spec = PreprocessSpec(image_size=28, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b"),
                          interpolation=interpolation)
    noise = np.random.default_rng(0).integers(0, 256, (12, 40), dtype=np.uint8)
    mode = TF.InterpolationMode(interpolation)
    for size in [(301, 90), (57, 1000), (640, 480), (200, 100)]:
        image = Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)  # smooth, as photos are
        expected = np.asarray(TF.center_crop(TF.resize(image, 28, interpolation=mode, antialias=True), [28, 28]))
        difference = np.abs(np.asarray(spec.resize(image)).astype(int) - expected.astype(int))
        if max(size) <= 2 * min(size):
            assert difference.max() == 0, size
        elif interpolation == "nearest":  # at a tie between two source pixels it may take the other one
            assert (difference > 0).mean() < 0.05, size
        else:
            assert difference.max() <= 2 and difference.mean() < 0.1, size


def test_a_large_transparent_image_is_shrunk_without_its_hidden_colours():
    """Shrinking before compositing averages premultiplied pixels: the colour of fully transparent pixels
    (green here, hidden) must not bleed into their opaque neighbours (red) on the white background."""
    pixels = np.zeros((600, 600, 4), np.uint8)
    pixels[:, :300] = (255, 0, 0, 255)
    pixels[:, 300:] = (0, 255, 0, 0)
    spec = PreprocessSpec(image_size=16, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3, class_names=("a", "b"),
                          background=255)
    assert spec.shrink(Image.fromarray(pixels)).size == (34, 34)  # by 18: the shorter side stays >= 32
    model_input = preprocess_upload(encode(Image.fromarray(pixels), "PNG"), spec, DecodeBudget())[0] * 255
    red, green, blue = model_input
    assert (red - 255).abs().max() <= 1 and (green - blue).abs().max() <= 1  # no green beyond the white's
    assert green[:, 0].max() < 1 and green[:, -1].min() > 254  # red on the left, the white background right


#: A PNG eXIf chunk without the TIFF byte-order header (seen from real cameras and editors): Pillow raises
#: SyntaxError reading it, though the pixels are fine.
DAMAGED_EXIF = b"\x00\x08\x00\x02\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"


def test_an_image_with_a_damaged_exif_block_is_used_as_stored(tmp_path):
    """The image folder's check (verify and load) never reads EXIF: such a file passed it, then failed the
    data set's statistics, or training mid-epoch on every retry, with no file named; serving answered 400."""
    from pipelines.config import DataConfig
    from pipelines.data import SplitDataset, describe_dataset, load_splits, write_sample_image
    from pipelines.image_folder import check_image_folder

    pixels = np.zeros((24, 24), np.uint8)
    pixels[6:18, 10:14] = 200
    for fmt in ("PNG", "WEBP"):
        data = encode_with(Image.fromarray(pixels), fmt, exif=DAMAGED_EXIF)
        with pytest.raises(Exception):  # noqa: B017 - whatever Pillow raises: the case this test is about
            Image.open(io.BytesIO(data)).getexif()
        assert preprocess_upload(data, SPEC, DecodeBudget()).shape == (1, 1, 16, 16)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.fromarray(np.roll(pixels, i, axis=1)).save(tmp_path / name / f"{i}.png", exif=DAMAGED_EXIF)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16)
    info = describe_dataset(cfg)
    assert len(info.class_names) == 2 and info.mean[0] > 0.05  # the statistics read every training image
    splits = load_splits(cfg, check_image_folder(cfg))
    spec = PreprocessSpec(image_size=16, channels=1, mean=(0.5,), std=(0.25,), class_names=("a", "b"))
    train = SplitDataset(splits.train, spec)
    assert len(train) > 0 and all(train[i][0].shape == (1, 16, 16) for i in range(len(train)))
    assert write_sample_image(cfg, tmp_path / "out").is_file()


def encode_with(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_a_colour_keyed_png_is_composited_like_the_same_image_with_alpha():
    """Grey or RGB PNGs with a transparency colour key (optipng's lossless form of a 0/255 alpha) kept the key
    colour, black, where the same drawing sent with an alpha channel was white: the model saw two images."""
    spec = PreprocessSpec(image_size=16, channels=1, mean=(0.0,), std=(1.0,), class_names=("a", "b"),
                          background=255)
    grey = np.zeros((32, 32), np.uint8)
    grey[8:24, 12:20] = 20  # dark strokes on a transparent key of 0
    alpha = np.where(grey > 0, 255, 0).astype(np.uint8)
    keyed = preprocess_upload(encode_with(Image.fromarray(grey), "PNG", transparency=0), spec, DecodeBudget())
    with_alpha = preprocess_upload(encode(Image.fromarray(np.stack([grey, alpha], -1), "LA"), "PNG"), spec,
                                   DecodeBudget())
    assert keyed[0, 0, 0, 0].item() == pytest.approx(1.0)  # the corner: the white background, not the key
    assert (keyed - with_alpha).abs().max().item() < 1e-6
    rgb = np.stack([grey] * 3, -1)
    keyed_rgb = preprocess_upload(encode_with(Image.fromarray(rgb), "PNG", transparency=(0, 0, 0)), spec,
                                  DecodeBudget())
    assert (keyed_rgb - with_alpha).abs().max().item() < 1e-6
    # A 16-bit PNG's key names a 16-bit value: it lost its transparency in the conversion to 8 bits (the key's
    # pixels kept their near-black grey).
    deep = Image.fromarray(grey.astype(np.uint16) * 257)
    assert deep.mode.startswith("I")
    keyed_deep = preprocess_upload(encode_with(deep, "PNG", transparency=0), spec, DecodeBudget())
    assert (keyed_deep - with_alpha).abs().max().item() < 1e-6
    # And it costs as much to decode as the 3x that its header is counted at (measured: 3.0x an RGB image's).
    with pytest.raises(ImageDecodeError, match="in mode I\\+alpha, counted 3x"):
        preprocess_upload(encode_with(Image.fromarray(np.zeros((60, 60), np.uint16)), "PNG", transparency=0), spec,
                          DecodeBudget(max_pixels=10_000))


def test_a_float_image_with_nan_or_inf_pixels_keeps_its_other_pixels():
    """One NaN made the image's peak NaN and every pixel black (and an inf every finite pixel 0)."""
    spec = PreprocessSpec(image_size=16, channels=1, mean=(0.0,), std=(1.0,), class_names=("a", "b"))
    ramp = np.tile(np.linspace(0, 100, 64, dtype=np.float32), (64, 1))
    clean = preprocess_upload(encode(Image.fromarray(ramp, mode="F"), "TIFF"), spec, DecodeBudget()).mean().item()
    for hole in (np.nan, np.inf):
        holed = ramp.copy()
        holed[3, 5] = hole
        mean = preprocess_upload(encode(Image.fromarray(holed, mode="F"), "TIFF"), spec, DecodeBudget()).mean().item()
        assert clean > 0.4 and mean == pytest.approx(clean, abs=0.01), hole


def _rle8_bmp(width: int, height: int) -> bytes:
    """A run-length encoded 8-bit BMP (Pillow reads but does not write them) of one-pixel runs: its worst case."""
    import struct

    row = b"".join(bytes([1, x & 0xFF]) for x in range(width)) + b"\x00\x00"  # runs, then end of line
    pixels = row * height + b"\x00\x01"  # end of bitmap
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(dib) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + dib + palette + pixels


def test_formats_pillow_decodes_in_python_are_refused_when_large():
    """An RLE8 BMP of 9.7 MB decoded for 2.1 s in Python (holding the interpreter from every other request), a
    plain-text PBM of 9.6 MB for 0.45 s; small ones, as real files are, still decode."""
    small = _rle8_bmp(64, 64)
    assert Image.open(io.BytesIO(small)).info.get("compression") == 1  # Pillow's BMP_RLE8
    assert preprocess_upload(small, SPEC, DecodeBudget()).shape == (1, 1, 16, 16)
    large = _rle8_bmp(1400, 1400)
    assert len(large) > 2 << 20
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="run-length encoded BMP over 1 MB"):
        preprocess_upload(large, SPEC, DecodeBudget())
    assert time.perf_counter() - started < 0.1
    plain = b"P1\n1500 1500\n" + b"0 1 " * (1500 * 1500 // 2)
    with pytest.raises(ImageDecodeError, match="plain-text"):
        preprocess_upload(plain, SPEC, DecodeBudget())
    assert preprocess_upload(b"P1\n4 4\n" + b"0 1 " * 8, SPEC, DecodeBudget()).shape == (1, 1, 16, 16)


def test_the_pixel_budget_counts_what_an_images_mode_costs_to_decode():
    """At 40 M pixels a float TIFF of 261 KB took 453 MB to decode, an RGBA PNG 302 MB, an RGB one 151 MB: the
    budget counted pixels only, so two small uploads in float cost 0.9 GB."""
    budget = DecodeBudget(max_pixels=10_000)
    ramp = np.tile(np.linspace(0, 1, 70, dtype=np.float32), (70, 1))  # 4,900 pixels
    assert preprocess_upload(encode(Image.fromarray((ramp * 255).astype(np.uint8)), "PNG"), SPEC, budget).shape \
        == (1, 1, 16, 16)
    with pytest.raises(ImageDecodeError, match=r"70x70 pixels \(in mode F, counted 3x"):
        preprocess_upload(encode(Image.fromarray(ramp, mode="F"), "TIFF"), SPEC, budget)
    rgba = np.zeros((70, 70, 4), np.uint8)
    assert preprocess_upload(encode(Image.fromarray(rgba), "PNG"), SPEC, budget).shape == (1, 1, 16, 16)  # 9,800
    with pytest.raises(ImageDecodeError, match="in mode RGBA, counted 2x"):
        preprocess_upload(encode(Image.fromarray(np.zeros((72, 72, 4), np.uint8)), "PNG"), SPEC, budget)
    keyed = encode_with(Image.fromarray(np.zeros((70, 70), np.uint8)).convert("P"), "PNG", transparency=0)
    with pytest.raises(ImageDecodeError, match="in mode P\\+alpha"):
        check_image_header(keyed, budget)


def test_the_pixel_budget_counts_what_a_webp_or_a_progressive_jpeg_costs_to_decode():
    """At 40 M pixels (the default budget) an RGB WebP of 133 KB took 607 MB to decode and a progressive JPEG
    379 MB (4:4:4) or 266 MB (4:2:0), against 157 MB as a PNG or a baseline JPEG: all were counted 1x."""
    budget = DecodeBudget(max_pixels=10_000)
    grey = Image.fromarray(np.zeros((60, 60), np.uint8))  # 3,600 pixels
    assert check_image_header(encode(grey, "PNG"), budget) is None
    assert check_image_header(encode_with(grey, "JPEG", progressive=False), budget) is None
    with pytest.raises(ImageDecodeError, match=r"60x60 pixels \(a WebP, counted 4x"):
        preprocess_upload(encode(grey, "WEBP"), SPEC, budget)
    assert check_image_header(encode(grey.resize((50, 50)), "WEBP"), budget) is None  # 2,500 pixels, 4x
    colour = Image.new("RGB", (64, 64), (90, 120, 150))  # 4,096 pixels
    with pytest.raises(ImageDecodeError, match=r"a progressive JPEG, counted 2\.5x"):
        check_image_header(encode_with(colour, "JPEG", progressive=True, subsampling=0), budget)  # 4:4:4
    # 4:2:0 keeps half the chroma coefficients: 1.75x
    assert check_image_header(encode_with(colour, "JPEG", progressive=True, subsampling=2), budget) is None
    with pytest.raises(ImageDecodeError, match=r"a progressive JPEG, counted 1\.75x"):
        check_image_header(encode_with(colour.resize((80, 80)), "JPEG", progressive=True, subsampling=2), budget)


def test_a_progressive_jpeg_from_a_phone_or_with_invalid_sampling_factors_is_counted_or_refused():
    """A progressive JPEG with an MPF segment (as phone cameras write) opens as an MPO and was counted 1x, not the
    2.5x of the same image without it; one whose frame header gives 0 as its sampling factors (Pillow does not
    check them) raised ZeroDivisionError in the budget's check: a 500."""
    budget = DecodeBudget(max_pixels=10_000)
    colour = Image.new("RGB", (64, 64), (90, 120, 150))  # 4,096 pixels, 2.5x as a 4:4:4 progressive JPEG
    phone = encode_with(colour, "MPO", progressive=True, subsampling=0, save_all=True, append_images=[colour])
    assert Image.open(io.BytesIO(phone)).format == "MPO"
    with pytest.raises(ImageDecodeError, match=r"a progressive JPEG, counted 2\.5x"):
        check_image_header(phone, budget)
    data = bytearray(encode_with(colour, "JPEG", progressive=True, subsampling=0))
    frame = data.index(b"\xff\xc2")
    for component in range(3):  # each component: its id, its sampling byte (h << 4 | v), its quantisation table
        data[frame + 10 + 3 * component + 1] = 0
    for check in (lambda: check_image_header(bytes(data), budget),
                  lambda: preprocess_upload(bytes(data), SPEC, DecodeBudget())):
        with pytest.raises(ImageDecodeError, match="sampling factors"):
            check()


@pytest.mark.parametrize("fmt", ["WEBP", "progressive JPEG"])
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from Linux's /proc")
def test_the_largest_webp_or_progressive_jpeg_the_budget_admits_costs_what_the_largest_png_does(tmp_path, fmt):
    """The factors are what decoding costs: the largest image the default budget admits in each format takes
    about the 157 MB (over the baseline) of a 40 M pixel RGB PNG, not 2.5-4 times it."""
    budget = DecodeBudget()
    options = {"quality": 80} if fmt == "WEBP" else {"progressive": True, "subsampling": 0}  # (4:4:4)

    def encoded(side: int) -> bytes:
        return encode_with(Image.new("RGB", (side, side), (90, 120, 150)), fmt.split()[-1], **options)

    factor, _ = decode_cost(open_image(encoded(8)))
    side = math.isqrt(int(budget.max_pixels / factor))  # the largest square the budget admits
    data = encoded(side)
    check_image_header(data, budget)
    with pytest.raises(ImageDecodeError):
        check_image_header(encoded(side + 2), budget)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    peak_mb = peak_mb_converting(upload)
    assert peak_mb < 200, f"{fmt} of {side}x{side}: {peak_mb:.0f} MB over the baseline"



def test_a_budget_above_pillows_own_limit_admits_the_images_within_it(monkeypatch):
    """serve.max_image_pixels above Pillow's own limit (twice ``Image.MAX_IMAGE_PIXELS``, 178,956,970 pixels):
    Pillow refused images within the budget itself, a 400 "image too large". A replica lets Pillow open what its
    budget admits (checked from the header before any pixel is decoded); the rest is refused by the budget."""
    import struct

    from pipelines.preprocess import admit_budget_in_pillow, check_image_header

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    header = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 10_000, 8, 2, 0, 0, 0))
              + _png_chunk(b"IEND", b""))  # 200,000,000 RGB pixels, none of them sent
    budget = DecodeBudget(max_pixels=250_000_000)
    with pytest.raises(ImageDecodeError, match="too large"):  # Pillow's refusal, within the budget
        check_image_header(header, budget)
    admit_budget_in_pillow(budget)
    check_image_header(header, budget)  # within the budget: passes its header check
    with pytest.raises(ImageDecodeError, match="above the limit of 150,000,000"):
        check_image_header(header, DecodeBudget(max_pixels=150_000_000))  # the budget's own refusal
    admit_budget_in_pillow(DecodeBudget(max_pixels=1000))  # a smaller budget never lowers Pillow's limit
    assert Image.MAX_IMAGE_PIXELS == 250_000_000


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a GPU"))])
def test_normalizing_a_batch_makes_its_constants_once_per_device_and_never_waits_for_the_gpu(device):
    """``torch.tensor(mean, device="cuda")`` at every batch copied from the host and waited for the GPU's queued
    work, twice per training step; the constants are now made once per device (and outside inference mode, so
    a spec first used to serve can still train)."""
    import torch

    from pipelines.preprocess import normalization_tensors

    spec = PreprocessSpec(image_size=4, channels=3, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1),
                          class_names=tuple("ab"))
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, device=device)
    expected = (images.float() / 255 - torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)) / torch.tensor(
        spec.std, device=device).view(1, 3, 1, 1)
    with torch.inference_mode():
        served = spec.normalize(images)
    first = normalization_tensors(spec.mean, spec.std, images.device)
    assert not first[0].is_inference()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host-device wait raises
    try:
        trained = spec.normalize(images)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(served, expected)
    torch.testing.assert_close(trained, expected)
    assert all(a is b for a, b in zip(first, normalization_tensors(spec.mean, spec.std, images.device), strict=True))


def test_a_one_bit_images_colour_key_is_counted_as_the_others_are():
    """A keyed 1-bit image is composited through an alpha band as a keyed grey one is, but was charged as a plain
    1-bit image: a 40 Mpx upload passed the budget using about twice the memory it is sized for."""
    from pipelines.preprocess import decode_mode

    buffer = io.BytesIO()
    Image.new("1", (8, 8), 1).save(buffer, "PNG", transparency=1)
    assert decode_mode(Image.open(io.BytesIO(buffer.getvalue()))) == "P+alpha"
