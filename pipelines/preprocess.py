"""The preprocessing spec that travels with every checkpoint, and the image conversion it defines.

Training, evaluation and serving all go through :class:`PreprocessSpec`, so a served model sees exactly
the pixels it was trained on: the same channel count, size, interpolation and normalisation.
"""

from __future__ import annotations

import functools
import io
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .image_structure import check_structure

__all__ = ["PreprocessSpec", "ImageDecodeError", "UnsupportedImageFormat", "DecodeBudget", "ACCEPTED_FORMATS",
           "open_image", "check_image_header", "admit_budget_in_pillow", "decode_image", "preprocess_upload",
           "decode_cost", "is_out_of_memory", "ALPHA_MODES"]

#: Pillow modes with an alpha band (a palette's transparency is in ``image.info`` instead).
ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})

#: torchvision's resize filters (``InterpolationMode`` values).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the process running out of memory: ``MemoryError``, or torch's allocators failing,
    which raise ``RuntimeError`` subclasses ("DefaultCPUAllocator: can't allocate memory", CUDA's "out of
    memory") that would otherwise read as bugs (500) or bad input (400)."""
    if isinstance(err, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    message = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in message or "out of memory" in message)


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can read (the message says why)."""


def has_sixteen_bit_samples(image: Image.Image) -> bool:
    """Whether ``image``, as opened (its format read: copies have none), holds 16-bit samples, which are scaled by
    65535: the I;16 modes, and mode I from PNG or PGM/PPM (Pillow opens those so only with 16-bit samples, a PGM's
    maxval scaled to 65535)."""
    return image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PNG", "PPM"))


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw images become model input.

    Attributes:
        image_size: side of the square model input.
        channels: 1 (grey-scale) or 3 (RGB); any image is converted to this.
        mean, std: per-channel normalisation of [0, 1] pixel values (from the training split).
        class_names: label names, index = class id.
        background: grey level (0-255) that transparent pixels are composited onto: the data set's own
            background (black for MNIST-like digits, white for most photos of objects on paper).
        interpolation: resize filter.
    """

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    background: int = 0
    interpolation: str = "bilinear"
    dataset: str = ""
    version: int = field(default=1)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("mean and std values must be finite numbers")  # else every input normalises to NaN
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        # A hand-edited or foreign spec: a string background failed every transparent upload (a 400 telling the
        # client to send RGB) while /healthz said ok; class names given as one string split into characters.
        if isinstance(self.background, bool) or not isinstance(self.background, int) or \
                not 0 <= self.background <= 255:
            raise ValueError(f"background must be a grey level from 0 to 255, got {self.background!r}")
        if not self.class_names or not all(isinstance(name, str) and name for name in self.class_names):
            raise ValueError(f"class_names must be non-empty strings, got {list(self.class_names)!r}")
        if not isinstance(self.dataset, str):
            raise ValueError(f"dataset must be a string, got {self.dataset!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def with_size(self, image_size: int) -> PreprocessSpec:
        return replace(self, image_size=image_size)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"], data["class_names"] = list(self.mean), list(self.std), list(self.class_names)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        data = dict(data)
        for key in ("mean", "std", "class_names"):
            if not isinstance(data[key], list | tuple):  # a string would pass as a sequence of characters
                raise ValueError(f"{key} must be a list, got {data[key]!r}")
            data[key] = tuple(data[key])
        return cls(**data)

    # -- pixels ---------------------------------------------------------------------------------------
    def convert_mode(self, image: Image.Image) -> Image.Image:
        """Any PIL mode (1, L, LA, P, RGBA, CMYK, LAB, I;16, I, F, ...) to ``L`` or ``RGB``, EXIF-upright, and
        shrunk by a whole factor first when it is over twice the input size (:meth:`shrink`).

        Memory stays near the decoded image's own: a 6320x6320 16-bit PNG of 78 KB took 1.07 GB over it
        through float64 copies of the whole image, a 4000x4000 RGBA PNG 305 MB through full-size compositing;
        now the scaling goes a band of rows at a time and the compositing works on the shrunk image.
        """
        image, orientation = self._shrinkable(image)
        image = self.shrink(image)
        if image.mode in ALPHA_MODES:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (self.background,) * 3 + (255,))
            image = Image.alpha_composite(canvas, rgba)
        target = "L" if self.channels == 1 else "RGB"
        if image.mode != target:
            try:
                image = image.convert(target)
            except ValueError:  # Pillow converts some modes (LAB) to RGB only
                image = image.convert("RGB").convert(target)
        return turned(image, orientation)

    def alpha_thumbnail(self, image: Image.Image) -> Image.Image:
        """``image`` shrunk as :meth:`convert_mode` shrinks it, its transparency kept (an alpha band in place of
        a palette's or a colour key's): what the choice of a background (``transparency_background``) reads."""
        return self.shrink(self._shrinkable(image)[0])

    def _shrinkable(self, image: Image.Image) -> tuple[Image.Image, int]:
        """``image`` in a mode :meth:`shrink` can average (8-bit, transparency as an alpha band), and its EXIF
        orientation: ``reduce`` refuses palette, 1-bit and 16-bit images."""
        # (read before any conversion: the copies have no format): 16-bit samples were stretched to each image's
        # own peak
        sixteen_bit = has_sixteen_bit_samples(image)
        # Turned upright last, once shrunk: turned first, a phone photo (EXIF orientation 6) was copied whole,
        # twice the memory the decode budget counts (306 against 159 MB for 40 Mpx). Read once the pixels are
        # loaded: Pillow's TIFF plugin turns a TIFF itself as it loads, and drops its tag (an image opened and
        # not loaded yet, as Image.open gives it, was turned twice).
        image.load()
        orientation = image_orientation(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            # A 16-bit PNG's colour key names a 16-bit value: matched before the scaling merges it with others
            key = image.info.get("transparency")
            scaled, alpha = _scaled_to_bytes(image, sixteen_bit=sixteen_bit,
                                             transparent=key if isinstance(key, int) else None)
            image = Image.fromarray(scaled, mode="L")
            if alpha is not None:  # composited on the background below, as the 8-bit image's colour key is
                image = Image.merge("LA", (image, Image.fromarray(alpha, mode="L")))
        if image.mode == "1" and isinstance(image.info.get("transparency"), int):
            # Its colour key: the conversion to L below dropped it (transparent areas kept their colour).
            key = 255 if image.info["transparency"] else 0
            grey = image.convert("L")
            image = Image.merge("LA", (grey, grey.point(lambda v: 0 if v == key else 255)))
        if image.mode in ("L", "RGB") and "transparency" in image.info:
            # A colour key (what optipng makes of an RGBA image whose alpha is all 0 or 255): composited on
            # the background like the same image sent with an alpha channel.
            image = image.convert("LA" if image.mode == "L" else "RGBA")
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in ("1", "PA"):
            image = image.convert("L" if image.mode == "1" else "RGBA")
        return image, orientation

    def shrink(self, image: Image.Image) -> Image.Image:
        """Average ``image`` down by the largest whole factor that keeps its shorter side at least twice
        ``image_size`` (the resize that follows then sees enough pixels to antialias); smaller images as they
        are. Pillow averages RGBA and LA premultiplied, so transparent pixels add no colour."""
        factor = min(image.size) // (2 * self.image_size)
        return image.reduce(factor) if factor >= 2 else image

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side to ``image_size`` and centre-crop a square (torchvision's ``resize`` and
        ``center_crop``).

        An image whose long side is over twice its short side is resized straight to the square that crop
        would keep (Pillow's ``box``: the same filter at the same scale over the same source pixels, equal up
        to rounding): a 40000x16 RGB strip became a 560000x224 image on the way (532 MB; now 2.4 MB), in
        training, where no upload budget refuses it.
        """
        import torchvision.transforms.v2.functional as TF  # noqa: N812 - deferred: a heavy import
        from torchvision.transforms.functional import pil_modes_mapping

        interpolation = TF.InterpolationMode(self.interpolation)
        size = self.image_size
        width, height = image.size
        if max(width, height) > 2 * min(width, height):
            # torchvision's arithmetic: the shorter side becomes `size`, the longer one int() in proportion,
            # and the crop starts at round() of half the difference.
            resized_w, resized_h = (size, int(size * height / width)) if width <= height else \
                (int(size * width / height), size)
            left, top = int(round((resized_w - size) / 2.0)), int(round((resized_h - size) / 2.0))
            scale_x, scale_y = width / resized_w, height / resized_h
            box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
            return image.resize((size, size), pil_modes_mapping[interpolation], box=box)
        image = TF.resize(image, size, interpolation=interpolation, antialias=True)
        return TF.center_crop(image, [size, size])

    def image_to_uint8(self, image: Image.Image) -> torch.Tensor:
        """A PIL image as the uint8 (C, H, W) tensor the model's loader would produce."""
        import torchvision.transforms.v2.functional as TF  # noqa: N812

        return TF.pil_to_tensor(self.resize(self.convert_mode(image)))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) to normalised float32 on the same device."""
        mean, std = normalization_tensors(tuple(self.mean), tuple(self.std), images.device)
        return (images.float().div_(255.0) - mean) / std

    def tensor_from_image(self, image: Image.Image) -> torch.Tensor:
        """Model input (1, C, H, W) float32 for one PIL image."""
        return self.normalize(self.image_to_uint8(image).unsqueeze(0))


@functools.lru_cache(maxsize=64)
def normalization_tensors(mean: tuple[float, ...], std: tuple[float, ...],
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as (1, C, 1, 1) tensors on ``device``, made once per device: ``torch.tensor(...,
    device="cuda")`` copies from the host and waits for the GPU to finish all queued work, twice per training
    step (the host could never queue a step ahead). Made outside inference mode, so training can use them too."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


#: The image formats an upload may be in (Pillow format names); anything else is refused before Pillow parses it.
#: Every format an image folder trains on is here (PPM: also .pgm, as face data sets such as ORL ship).
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


def import_resizing() -> None:
    """Import what resizing uses (torchvision's transforms, deferred: 1.4 s of CPU). A serving replica does it
    when it starts: its first request paid it, 5.6 s against 1 ms for the next (a 503 under a 3 s deadline),
    with the event loop stalled meanwhile."""
    import torchvision.transforms.functional  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (a phone photo); itself when upright, or when its EXIF
    cannot be read (:func:`image_orientation`)."""
    if image_orientation(image) != 1:  # exif_transpose copies even an upright image
        image = ImageOps.exif_transpose(image)
    return image


#: How each EXIF orientation is undone (Pillow's ``exif_transpose``).
_UNDO_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                     7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def turned(image: Image.Image, orientation: int) -> Image.Image:
    """``image`` turned upright from EXIF ``orientation`` (read from the file's image before conversions that
    drop its EXIF); itself when that is 1 or unknown."""
    method = _UNDO_ORIENTATION.get(orientation)
    return image.transpose(method) if method is not None else image


def key_on_pixel_scale(image: Image.Image) -> Image.Image:
    """``image`` (just opened, not loaded) with a 2- or 4-bit grey PNG's colour key on the scale of its pixels:
    Pillow keeps the key on the file's (a 2-bit white is 3) and stretches the pixels to 0-255, so no pixel matched
    it and transparent areas kept their colour. Read from the file's sample layout, which the load drops."""
    tile = getattr(image, "tile", None) or []
    raw = tile[0][3] if tile else None
    raw = raw[0] if isinstance(raw, tuple) and raw else raw
    scale = {"L;2": 85, "L;4": 17}.get(raw, 1) if isinstance(raw, str) else 1
    key = image.info.get("transparency")
    if image.mode == "L" and scale > 1 and isinstance(key, int):
        image.info["transparency"] = min(key * scale, 255)
    return image


#: The EXIF tag of an image's orientation (1: upright; 2-8: how it is to be turned).
EXIF_ORIENTATION = 0x0112


def image_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright). An EXIF block Pillow cannot parse (a PNG eXIf chunk without its
    byte-order header, as some cameras and editors write) reads as upright: the pixels are fine, and the
    check of an image folder never reads EXIF, so raising here failed training mid-epoch on every retry."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - Pillow raises SyntaxError, struct.error, ValueError... for damaged EXIF
        return 1


def _scaled_to_bytes(image: Image.Image, rows: int = 256, *, sixteen_bit: bool = False,
                     transparent: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A 16-bit, 32-bit integer or float image as uint8: 16-bit (modes I;16, or ``sixteen_bit``) scaled by
    255/65535, the others by their own peak, clipped at 0. A band of ``rows`` at a time: float copies of the
    whole image cost 4-8 bytes a pixel. With ``transparent`` (a colour key), also the alpha channel it makes
    (0 where a pixel is that value), else None."""
    source = np.asarray(image)
    alpha = None if transparent is None else np.empty(source.shape, dtype=np.uint8)
    if sixteen_bit or image.mode.startswith("I;16"):
        peak = np.float32(65535.0)
    elif image.mode == "F":  # NaN or inf pixels (holes in depth or remote-sensing data) made the peak NaN
        bands = (source[top:top + rows] for top in range(0, source.shape[0], rows))
        peak = np.float32(max([1.0] + [float(band[np.isfinite(band)].max(initial=0.0)) for band in bands]))
    else:
        peak = np.float32(max(float(source.max()), 1.0))
    scaled = np.empty(source.shape, dtype=np.uint8)
    for top in range(0, source.shape[0], rows):
        # times 255 first: exact in float32 for every 16-bit value, so integer results stay integers
        band = np.nan_to_num(source[top:top + rows].astype(np.float32), nan=0.0, posinf=peak, neginf=0.0)
        band = band * np.float32(255.0) / peak
        scaled[top:top + rows] = np.clip(band, 0, 255)
        if alpha is not None:
            alpha[top:top + rows] = np.where(source[top:top + rows] == transparent, 0, 255)
    return scaled, alpha


#: Memory per pixel of decoding an image in a Pillow mode (what :meth:`PreprocessSpec.convert_mode` does with
#: it), relative to an RGB image's; measured on 40 M pixel images: RGB +151 MB, float TIFF +453 MB, RGBA and
#: LA PNGs +302 MB, a palette PNG with transparency +340 MB, 16-bit +225 MB, 16-bit with a transparent colour
#: +459 MB (against RGB's +153 MB that day). "P+alpha": a palette, grey or RGB image with a transparent colour,
#: "I+alpha": a 16-bit one (:func:`decode_mode`).
DECODE_COST: dict[str, float] = {"F": 3.0, "I": 3.0, "RGBA": 2.0, "LA": 2.0, "PA": 2.0, "RGBa": 2.0, "La": 2.0,
                                 "P+alpha": 2.25, "I;16": 1.5, "I;16B": 1.5, "I;16L": 1.5, "I;16N": 1.5,
                                 "I+alpha": 3.0}


def decode_mode(image: Image.Image) -> str:
    """The mode :data:`DECODE_COST` knows ``image`` by: its own, or "P+alpha" for a transparent colour key."""
    if "transparency" in image.info and image.mode in ("1", "P", "L", "RGB", "I;16", "I;16B", "I;16L", "I;16N", "I"):
        return "P+alpha" if not image.mode.startswith("I") else "I+alpha"
    return image.mode


#: What decoding a WebP costs per pixel, relative to an RGB image's, whatever its mode: Pillow decodes every
#: WebP through libwebp's animation decoder, two RGBA canvases and a copy of the frame (40 M pixels: +607 MB
#: over the baseline as an RGB WebP of 133 KB, RGBA the same per pixel, against +157 MB as a PNG).
WEBP_DECODE_COST = 4.0


def _progressive_jpeg_cost(image: Image.Image) -> float:
    """A progressive JPEG's decoder holds every component's DCT coefficients (2 bytes a sample) until the last
    scan, on top of the image: 1 + half the samples per pixel (measured at 40 M pixels: 4:4:4 RGB +379 MB, 2.4x;
    4:2:0 +266 MB, 1.7x; CMYK +455 MB, 2.9x)."""
    sampling = [(h, v) for _, h, v, _ in getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())]
    if not all(1 <= h <= 4 and 1 <= v <= 4 for h, v in sampling):  # Pillow does not check them (0: a 500)
        raise ImageDecodeError(f"the JPEG's sampling factors {sampling} are not valid (1 to 4 each)")
    most = max(h for h, _ in sampling) * max(v for _, v in sampling)
    return 1.0 + 0.5 * sum(h * v for h, v in sampling) / most


def decode_cost(image: Image.Image) -> tuple[float, str]:
    """What decoding ``image`` (opened, header only) costs in memory per pixel, relative to an RGB PNG's or
    baseline JPEG's, and what makes it cost that (for an error message): its mode (:data:`DECODE_COST`), or its
    format where that costs more (a WebP, a progressive JPEG)."""
    mode = decode_mode(image)
    costs = [(DECODE_COST.get(mode, 1.0), f"in mode {mode}")]
    if image.format == "WEBP":
        costs.append((WEBP_DECODE_COST, "a WebP"))
    # (Pillow opens a JPEG with an MPF segment, as phone cameras write, as an MPO: its first frame decodes the same)
    elif image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        costs.append((_progressive_jpeg_cost(image), "a progressive JPEG"))
    return max(costs, key=lambda cost: cost[0])


@dataclass(frozen=True)
class DecodeBudget:
    """What one upload may cost, checked from its header before any pixel is decoded or resized.

    Attributes:
        max_pixels: width x height of the input image.
        max_aspect_ratio: its long side over its short side.
        max_resized_pixels: the image once its shorter side is resized to the model input (before the centre
            crop): a 4,000,000 x 1 strip is small as a file and as an input, but not after that resize.
    """

    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 20.0
    max_resized_pixels: int = 4_000_000

    def check(self, width: int, height: int, image_size: int | None = None,
              cost: tuple[float, str] = (1.0, "")) -> None:
        """Raise :class:`ImageDecodeError` if a ``width`` x ``height`` image (resized for ``image_size``) is over.

        ``max_pixels`` counts RGB pixels: an image that costs more to decode counts as many as its decoding
        costs in memory (``cost``: :func:`decode_cost`'s factor and reason; a float TIFF 3x, an image with alpha
        or transparency 2x, a WebP 4x)."""
        if width < 1 or height < 1:
            raise ImageDecodeError("image has no pixels")
        factor, reason = cost
        if width * height * factor > self.max_pixels:
            counted = f" ({reason}, counted {factor:.3g}x: what it costs to decode)" if factor != 1.0 else ""
            raise ImageDecodeError(f"image has {width}x{height} pixels{counted}, above the limit of "
                                   f"{self.max_pixels:,}")
        short, long = sorted((width, height))
        if long / short > self.max_aspect_ratio:
            raise ImageDecodeError(f"image of {width}x{height} pixels has an aspect ratio above the limit of "
                                   f"{self.max_aspect_ratio:g}")
        if image_size is not None:
            # What :meth:`PreprocessSpec.resize` makes: the shorter side image_size, the longer one in proportion
            # (torchvision's int), or straight the square for a long side over twice the short one. (Counting the
            # strip refused a 600x7200 panorama for a 600-pixel model, which the resize takes in 0.2 s.)
            resized = image_size * (int(image_size * long / short) if long <= 2 * short else image_size)
            if resized > self.max_resized_pixels:
                raise ImageDecodeError(f"image of {width}x{height} pixels resizes to {resized:,} pixels for a "
                                       f"{image_size}-pixel model, above the limit of {self.max_resized_pixels:,}")

    def admits_model_input(self, image_size: int) -> bool:
        """Whether a model taking ``image_size`` x ``image_size`` pixels can be served at all: under a lower
        ``max_resized_pixels`` every request to it is refused, even a square image of that size."""
        return image_size ** 2 <= self.max_resized_pixels

    @classmethod
    def for_serving(cls, serve) -> DecodeBudget:
        """The budget of a ``serve`` config section (:class:`pipelines.config.ServeConfig`)."""
        return cls(serve.max_image_pixels, serve.max_aspect_ratio, serve.max_resized_pixels)


def admit_budget_in_pillow(budget: DecodeBudget) -> None:
    """Let Pillow open every image ``budget`` admits. Pillow refuses, by itself, images over twice
    ``Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels by default; a warning over it): under a larger
    ``serve.max_image_pixels`` images within the budget were refused with a 400. The budget is checked from the
    header first, counting pixels by what they cost to decode, so it is the limit that holds. Pillow's setting is
    process-wide: for a replica's process, whose every decode goes through its budget; it is only ever raised."""
    if Image.MAX_IMAGE_PIXELS is not None and budget.max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = budget.max_pixels


class UnsupportedImageFormat(ImageDecodeError):
    """An image in a format Pillow knows but this server does not accept (HTTP 415)."""


#: ISO-BMFF brands of HEIF images (an iPhone's photos): Pillow has no plugin that would recognise them.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def _known_format(prefix: bytes) -> str | None:
    """The Pillow format whose signature ``prefix`` carries (its header is not parsed), or None; "HEIF" for
    HEIF/HEIC, which Pillow does not know either (a 415 then says what the server takes, not "unreadable")."""
    if prefix[4:8] == b"ftyp" and prefix[8:12] in _HEIF_BRANDS:
        return "HEIF"
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a signature check that fails is no match
            continue
    return None


def open_image_file(path: str | os.PathLike) -> Image.Image:
    """A training image file, opened as serving opens an upload of it: from its bytes, with the plugins of
    :data:`ACCEPTED_FORMATS`. Opened by path, Pillow memory-maps an uncompressed TIFF and read one turned by its
    EXIF (orientations 5-8) with the turned width as its row stride: training saw stripes where the server saw
    the picture."""
    return key_on_pixel_scale(Image.open(io.BytesIO(Path(path).read_bytes()), formats=list(ACCEPTED_FORMATS)))


def open_image(data: bytes, formats: tuple[str, ...] = ACCEPTED_FORMATS) -> Image.Image:
    """Open image bytes lazily (header only) with the plugins of ``formats`` and no others.

    Raises :class:`UnsupportedImageFormat` for another format Pillow would recognise (EPS, PSD, ICO, ...) and
    :class:`ImageDecodeError` for empty or non-image bytes, or a container Pillow would take seconds to parse
    (:func:`~pipelines.image_structure.check_structure`).
    """
    if not data:
        raise ImageDecodeError("empty body: send the image bytes")
    check_structure(data)
    try:
        return key_on_pixel_scale(Image.open(io.BytesIO(data), formats=list(formats)))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"image too large: {err}") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for garbage input
        pass
    other = _known_format(data[:16])
    if other is not None and other not in formats:
        raise UnsupportedImageFormat(f"{other} images are not accepted; send {', '.join(formats)}") from None
    raise ImageDecodeError(f"the body is not a readable image ({', '.join(formats)})") from None


def _load_pixels(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"image too large: {err}") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(f"the image data is truncated or corrupt ({type(err).__name__})") from None
    return image


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes with Pillow, fully, refusing anything that is not a sane image.

    Raises :class:`ImageDecodeError` for empty or non-image bytes, truncated files and images above
    ``max_pixels`` (decompression bombs; counted as :func:`decode_cost` says) - checked from the header, before
    the pixels are decoded - and
    :class:`UnsupportedImageFormat` for formats other than :data:`ACCEPTED_FORMATS`.
    """
    image = open_image(data)
    # Only the pixel count: the aspect ratio and resize limits concern a model's input (preprocess_upload).
    DecodeBudget(max_pixels=max_pixels, max_aspect_ratio=math.inf).check(image.width, image.height,
                                                                         cost=decode_cost(image))
    return _load_pixels(image)


def check_image_header(data: bytes, budget: DecodeBudget) -> None:
    """Open an upload's header (no pixels) and check it against ``budget``, all but the resize (which needs the
    model's input size): what a server can refuse before it loads a model for the request.

    Raises :class:`ImageDecodeError` (:class:`UnsupportedImageFormat` for a refused format).
    """
    image = open_image(data)
    budget.check(image.width, image.height, cost=decode_cost(image))


def preprocess_upload(data: bytes, spec: PreprocessSpec, budget: DecodeBudget) -> torch.Tensor:
    """An uploaded image as model input (1, C, H, W), within ``budget``; checked before decoding.

    Every failure to read or convert the image is an :class:`ImageDecodeError` (its subclass
    :class:`UnsupportedImageFormat` for a refused format); running out of memory is a ``MemoryError``.
    """
    image = open_image(data)
    budget.check(image.width, image.height, spec.image_size, cost=decode_cost(image))
    _load_pixels(image)
    try:
        return spec.tensor_from_image(image)
    except Exception as err:  # noqa: BLE001 - Pillow and numpy raise many types for odd modes
        if is_out_of_memory(err):
            raise MemoryError(str(err)) from None
        raise ImageDecodeError(f"cannot convert the {image.mode} image to model input ({err}); send an RGB, "
                               "grey-scale, palette or CMYK image") from None
