"""The preprocessing spec that travels with every checkpoint, and the image conversion it defines.

Training, evaluation and serving all go through :class:`PreprocessSpec`, so a served model sees exactly
the pixels it was trained on: the same channel count, size, interpolation and normalisation.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["PreprocessSpec", "ImageDecodeError", "decode_image"]


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can read (the message says why)."""


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
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")

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
            data[key] = tuple(data[key])
        return cls(**data)

    # -- pixels ---------------------------------------------------------------------------------------
    def convert_mode(self, image: Image.Image) -> Image.Image:
        """Any PIL mode (1, L, LA, P, RGBA, CMYK, I;16, I, F, ...) to ``L`` or ``RGB``, EXIF-upright."""
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            array = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
            image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (self.background,) * 3 + (255,))
            image = Image.alpha_composite(canvas, rgba)
        target = "L" if self.channels == 1 else "RGB"
        return image.convert(target) if image.mode != target else image

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side to ``image_size`` and centre-crop a square."""
        import torchvision.transforms.v2.functional as TF  # noqa: N812 - deferred: a heavy import

        interpolation = TF.InterpolationMode(self.interpolation)
        image = TF.resize(image, self.image_size, interpolation=interpolation, antialias=True)
        return TF.center_crop(image, [self.image_size, self.image_size])

    def image_to_uint8(self, image: Image.Image) -> torch.Tensor:
        """A PIL image as the uint8 (C, H, W) tensor the model's loader would produce."""
        import torchvision.transforms.v2.functional as TF  # noqa: N812

        return TF.pil_to_tensor(self.resize(self.convert_mode(image)))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) to normalised float32 on the same device."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std

    def tensor_from_image(self, image: Image.Image) -> torch.Tensor:
        """Model input (1, C, H, W) float32 for one PIL image."""
        return self.normalize(self.image_to_uint8(image).unsqueeze(0))


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes with Pillow, fully, refusing anything that is not a sane image.

    Raises :class:`ImageDecodeError` for empty or non-image bytes, truncated files and images above
    ``max_pixels`` (decompression bombs) - checked from the header, before the pixels are decoded.
    """
    if not data:
        raise ImageDecodeError("empty body: send the image bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"image too large: {err}") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for garbage input
        raise ImageDecodeError("the body is not a readable image (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError("image has no pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(f"image has {width}x{height} pixels, above the limit of {max_pixels:,}")
    try:
        image.load()
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"image too large: {err}") from None
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(f"the image data is truncated or corrupt ({type(err).__name__})") from None
    return image
