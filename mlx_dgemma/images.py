"""Images in: loading, the reference processor's preprocessing, and the prompt's image tokens.

`load_image` reads a path, bytes, a `data:` URL or a PIL image into an RGB
PIL image, refusing what it cannot or should not decode (one-line
ValueErrors). `prepare_image` turns it into what the vision tower takes, as
transformers' Gemma 4 image processor computes it: resized (bicubic, aspect
ratio kept) to the largest size whose sides are multiples of
patch_size x pooling_kernel_size and that fits max_soft_tokens x
pooling_kernel_size^2 patches, scaled to [0, 1], cut into patches
(row-major, each patch's pixels row-major with the channels innermost),
padded to the full patch budget (zeros, position -1), with each patch's
(column, row) position. The image takes one soft token per pooled
kernel of patches: in the prompt, the chat template's image placeholder
becomes begin-of-image, that many image tokens, end-of-image.

No torch here: numpy and Pillow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# The largest image decoded, in pixels (width x height), checked from the file's header before any pixel is
# decoded. 50 megapixels is a large camera photo (an 8K frame is 33 MP); decoded as RGB it is 150 MB, and the
# processor shrinks every image to at most 645,120 pixels anyway. Pillow's own decompression-bomb limit
# (Image.MAX_IMAGE_PIXELS) applies too when it is lower.
MAX_IMAGE_PIXELS = 50_000_000
# Formats decoded. Others (EPS, which runs Ghostscript, ICO, PSD, ...) are refused before decoding.
SUPPORTED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
# The soft-token budgets transformers' Gemma 4 processor accepts.
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
# A remote image (the server, only when allowed): at most this many bytes, fetched within this many seconds.
MAX_REMOTE_IMAGE_BYTES = 20 * 1024 * 1024
REMOTE_TIMEOUT_SECONDS = 10.0

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, "PreparedImage"]


# ----------------------------------------------------------------- settings


@dataclass(frozen=True)
class VisionSettings:
    """How images are preprocessed: the checkpoint's processor config, or Gemma 4's defaults."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280
    resample: int = Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {self.max_soft_tokens}")
        if self.patch_size < 1 or self.pooling_kernel_size < 1:
            raise ValueError("patch_size and pooling_kernel_size must be positive")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    @classmethod
    def from_dicts(cls, processor: dict[str, Any] | None, config: dict[str, Any] | None = None) -> VisionSettings:
        """From an image processor's settings (processor_config.json's "image_processor", or a flat
        preprocessor_config.json), falling back on config.json's vision_config, then Gemma 4's defaults."""
        processor = processor or {}
        vision = (config or {}).get("vision_config") or {}
        values: dict[str, Any] = {}
        for name in ("patch_size", "pooling_kernel_size"):
            value = processor.get(name, vision.get(name))
            if value is not None:
                values[name] = int(value)
        for name in ("max_soft_tokens", "resample"):
            if processor.get(name) is not None:
                values[name] = int(processor[name])
        for name in ("do_rescale", "do_normalize"):
            if processor.get(name) is not None:
                values[name] = bool(processor[name])
        if processor.get("rescale_factor") is not None:
            values["rescale_factor"] = float(processor["rescale_factor"])
        for name in ("image_mean", "image_std"):
            value = processor.get(name)
            if value is not None:
                values[name] = tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: dict[str, Any] | None = None) -> VisionSettings:
        """The settings a checkpoint directory's processor_config.json (or preprocessor_config.json) gives."""
        path = Path(path)
        if config is None and (path / "config.json").is_file():
            config = _read_json(path / "config.json")
        processor: dict[str, Any] | None = None
        if (path / "processor_config.json").is_file():
            processor = _read_json(path / "processor_config.json").get("image_processor")
        if processor is None and (path / "preprocessor_config.json").is_file():
            processor = _read_json(path / "preprocessor_config.json")
        try:
            return cls.from_dicts(processor, config)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: image processor settings: {error}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


# ----------------------------------------------------------------- loading


def load_image(source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, the file's bytes, a `data:` URL (base64) or a PIL image.

    Files are decoded only in the formats of SUPPORTED_FORMATS, only up to `max_pixels`, and turned
    upright by their EXIF orientation, as transformers' `load_image` does. Transparency is composited
    on white, as its image processor does. Raises a one-line ValueError for anything it refuses.
    """
    if isinstance(source, PreparedImage):
        raise ValueError("this image is already prepared")
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "the image")
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), "the image data", max_pixels)
    if isinstance(source, str) and source[:5].lower() == "data:":
        return _decode(decode_data_url(source), "the data: URL's image", max_pixels)
    if isinstance(source, str) and source[:8].lower().startswith(("http://", "https://")):
        raise ValueError(f"remote image URLs are not fetched: download the image and pass the file ({source[:60]})")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"image file not found: {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not an image file")
        try:
            with open(path, "rb") as file:
                return _decode(file, str(path), max_pixels)
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    raise ValueError(f"an image must be a path, bytes, a data: URL or a PIL image, not {type(source).__name__}")


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URL."""
    head, comma, payload = url.partition(",")
    if not comma:
        raise ValueError("a data: URL needs a comma before its data")
    media = head[5:].split(";")
    if not media[0].lower().startswith("image/") and media[0]:
        raise ValueError(f"a data: URL with media type {media[0]!r} is not an image")
    if "base64" not in (part.strip().lower() for part in media[1:]):
        raise ValueError("an image data: URL must be base64 (data:image/png;base64,...)")
    return decode_base64(payload, "the data: URL")


def decode_base64(text: str, what: str = "the image") -> bytes:
    """Base64 (standard or URL-safe; whitespace allowed, padding optional) to bytes; a one-line ValueError when
    it is not."""
    cleaned = "".join(text.split())
    cleaned += "=" * (-len(cleaned) % 4)
    if _BASE64.fullmatch(cleaned):
        decode = base64.b64decode
    elif _URLSAFE_BASE64.fullmatch(cleaned):
        decode = base64.urlsafe_b64decode
    else:
        raise ValueError(f"{what} is not valid base64")
    try:
        data = decode(cleaned)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if not data:
        raise ValueError(f"{what} is empty")
    return data


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URLSAFE_BASE64 = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def fetch_remote_image(url: str, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
    """The bytes at an http(s) URL, at most `max_bytes` (MAX_REMOTE_IMAGE_BYTES), all within `timeout` seconds
    (REMOTE_TIMEOUT_SECONDS)."""
    max_bytes = max_bytes or MAX_REMOTE_IMAGE_BYTES
    timeout = timeout or REMOTE_TIMEOUT_SECONDS
    if not url[:8].lower().startswith(("http://", "https://")):
        raise ValueError("only http:// and https:// image URLs can be fetched")
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-dgemma", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ValueError(f"the image at {url[:80]} is larger than {_mib(max_bytes)}")
            deadline = time.monotonic() + timeout
            chunks, size = [], 0
            while size <= max_bytes:
                if time.monotonic() > deadline:
                    raise ValueError(f"fetching {url[:80]}: no whole image within {timeout:g} s")
                chunk = response.read(min(64 * 1024, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
    except urllib.error.HTTPError as error:
        raise ValueError(f"fetching {url[:80]}: HTTP {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise ValueError(f"fetching {url[:80]}: {reason}") from None
    if len(data) > max_bytes:
        raise ValueError(f"the image at {url[:80]} is larger than {_mib(max_bytes)}")
    if not data:
        raise ValueError(f"the image at {url[:80]} is empty")
    return data


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"


def _decode(source: bytes | io.BufferedIOBase, what: str, max_pixels: int) -> Image.Image:
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    if isinstance(source, bytes) and not source:
        raise ValueError(f"{what} is empty")
    with warnings.catch_warnings():
        # Pillow warns (then errors) above its decompression-bomb limit: make the warning an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(data, formats=_decoders())
        except Image.DecompressionBombError:
            raise ValueError(f"{what} is too large to decode safely (Pillow's decompression-bomb guard)") from None
        except Image.DecompressionBombWarning:
            raise ValueError(f"{what} is too large to decode safely (Pillow's decompression-bomb guard)") from None
        except UnidentifiedImageError:
            raise ValueError(_unidentified(data, what)) from None
        except Exception as error:  # a plugin refusing a damaged header: SyntaxError, struct.error, ...
            raise ValueError(f"{what} is not a readable image ({_reason(error)})") from None
        try:
            _check_pixels(image.size, max_pixels, what)
            image.seek(0)  # an animation's first frame
            previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                image.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = previous
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
        except ValueError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"{what} is too large to decode safely (Pillow's decompression-bomb guard)") from None
        except Exception as error:  # truncated or corrupt data
            raise ValueError(f"{what} could not be decoded: {_reason(error)}") from None


def _decoders() -> tuple[str, ...]:
    Image.init()  # registers every plugin Pillow has (MPO and WebP are not among the few it preloads)
    return tuple(name for name in SUPPORTED_FORMATS if name in Image.OPEN)


def _unidentified(data: io.IOBase, what: str) -> str:
    """Why Pillow could not open it: a format we do not decode, or not an image at all."""
    try:
        data.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kind = Image.open(data).format  # identify only: nothing is decoded
    except Exception:
        kind = None
    if kind:
        return f"{what} is a {kind} image, which is not supported: use {FORMAT_NAMES}"
    return f"{what} is not an image (or not in a supported format: {FORMAT_NAMES})"


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{what} is empty ({width}x{height} pixels)")
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS:
        limit = min(limit, int(Image.MAX_IMAGE_PIXELS))
    if width * height > limit:
        raise ValueError(
            f"{what} is {width}x{height} pixels ({width * height / 1e6:.1f} MP); the limit is {limit / 1e6:g} MP"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (the reference processor's conversion)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# ----------------------------------------------------------------- preprocessing


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One image as the vision tower takes it, and how many soft tokens it becomes."""

    pixel_values: np.ndarray = field(repr=False)  # float32 (max_patches, patch_size^2 * 3), zero padding patches
    position_ids: np.ndarray = field(repr=False)  # int64 (max_patches, 2): (column, row), -1 for padding patches
    num_soft_tokens: int
    size: tuple[int, int]  # (height, width) after resizing
    digest: str  # identifies the pixel values (prompt caches key images by it)


def aspect_preserving_size(height: int, width: int, settings: VisionSettings) -> tuple[int, int]:
    """The (height, width) an image is resized to: the reference processor's rule.

    Scaled to the patch budget's area, each side rounded down to a multiple of
    patch_size x pooling_kernel_size; a side that rounds to nothing gets one
    multiple and the other side the aspect ratio's whole multiples (capped).
    """
    patch, kernel = settings.patch_size, settings.pooling_kernel_size
    budget = settings.max_patches * patch**2
    scale = math.sqrt(budget / (height * width))
    step = kernel * patch
    new_height = int(math.floor(scale * height / step)) * step
    new_width = int(math.floor(scale * width / step)) * step
    if new_height == 0 and new_width == 0:
        raise ValueError(f"a {width}x{height} image cannot be resized to whole {step}-pixel blocks")
    longest = (settings.max_patches // kernel**2) * step
    if new_height == 0:
        new_height, new_width = step, min(int(math.floor(width / height)) * step, longest)
    elif new_width == 0:
        new_width, new_height = step, min(int(math.floor(height / width)) * step, longest)
    if new_height * new_width > budget:
        raise ValueError(f"a {width}x{height} image does not fit {settings.max_patches} patches")
    return new_height, new_width


def soft_token_count(height: int, width: int, settings: VisionSettings) -> int:
    """How many soft tokens (image tokens in the prompt) an image of this size becomes."""
    new_height, new_width = aspect_preserving_size(height, width, settings)
    patches = (new_height // settings.patch_size) * (new_width // settings.patch_size)
    return patches // settings.pooling_kernel_size**2


def prepare_image(
    image: ImageSource, settings: VisionSettings | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> PreparedImage:
    """Load (see `load_image`) and preprocess one image as transformers' Gemma 4 image processor does."""
    if isinstance(image, PreparedImage):
        return image
    settings = settings or VisionSettings()
    rgb = load_image(image, max_pixels)
    width, height = rgb.size
    new_height, new_width = aspect_preserving_size(height, width, settings)
    if (new_height, new_width) != (height, width):
        rgb = rgb.resize((new_width, new_height), resample=settings.resample)
    pixels = np.asarray(rgb, dtype=np.uint8)  # (height, width, 3)
    if settings.do_rescale:
        values = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    else:
        values = pixels.astype(np.float32)
    if settings.do_normalize:
        mean = np.asarray(settings.image_mean, dtype=np.float32)
        std = np.asarray(settings.image_std, dtype=np.float32)
        values = (values - mean) / std
    patch = settings.patch_size
    rows, cols = new_height // patch, new_width // patch
    # (rows, patch, cols, patch, 3) -> (rows, cols, patch, patch, 3): a patch's pixels row-major, channels inner.
    patches = values.reshape(rows, patch, cols, patch, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    column, row = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([column, row], axis=-1).reshape(rows * cols, 2).astype(np.int64)
    count = rows * cols
    padded = np.zeros((max(settings.max_patches, count), settings.patch_dim), dtype=np.float32)
    padded[:count] = patches
    padded_positions = np.full((padded.shape[0], 2), -1, dtype=np.int64)
    padded_positions[:count] = positions
    digest = hashlib.sha256(padded.tobytes() + padded_positions.tobytes()).hexdigest()
    soft = count // settings.pooling_kernel_size**2
    return PreparedImage(padded, padded_positions, soft, (new_height, new_width), digest)


def prepare_images(
    images: Sequence[ImageSource], settings: VisionSettings | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> list[PreparedImage]:
    """`prepare_image` for each; a refused image's error names its place when there are several."""
    prepared = []
    for index, image in enumerate(images):
        try:
            prepared.append(prepare_image(image, settings, max_pixels))
        except ValueError as error:
            if len(images) == 1:
                raise
            raise ValueError(f"image {index + 1}: {error}") from None
    return prepared


# ----------------------------------------------------------------- the prompt's image tokens


@dataclass(frozen=True)
class ImageTokens:
    """The ids an image takes in a prompt: the template's placeholder, and what replaces it."""

    placeholder: int  # what the chat template writes where an image goes (<|image|>)
    begin: int  # <|image>
    image: int  # <|image|>, once per soft token; the model puts the image's features there
    end: int  # <image|>

    def run(self, count: int) -> list[int]:
        return [self.begin, *([self.image] * count), self.end]


def image_tokens(config: dict[str, Any], tokenizer: Any) -> ImageTokens:
    """The checkpoint's image token ids: config.json's where given, else the tokenizer's."""

    def token_id(name: str, default: str) -> int | None:
        token = getattr(tokenizer, name, None) or default
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or found == getattr(tokenizer, "unk_token_id", None):
            return None
        return int(found)

    placeholder = token_id("image_token", "<|image|>")
    image = config.get("image_token_id", placeholder)
    begin = config.get("boi_token_id", token_id("boi_token", "<|image>"))
    end = config.get("eoi_token_id", token_id("eoi_token", "<image|>"))
    if placeholder is None:
        placeholder = image
    if None in (placeholder, image, begin, end):
        raise ValueError("this checkpoint's tokenizer has no image tokens (<|image>, <|image|>, <image|>)")
    return ImageTokens(int(placeholder), int(begin), int(image), int(end))


def expand_placeholders(ids: Sequence[int], images: Sequence[PreparedImage], tokens: ImageTokens) -> list[int]:
    """`ids` with each image placeholder replaced by its image's run: begin, one image token per soft token, end.

    The placeholders and the images pair up in order; their counts must agree.
    """
    found = sum(1 for token in ids if token == tokens.placeholder)
    if found != len(images):
        raise ValueError(f"the prompt has {found} image placeholders for {len(images)} images")
    out: list[int] = []
    pending = iter(images)
    for token in ids:
        if token == tokens.placeholder:
            out += tokens.run(next(pending).num_soft_tokens)
        else:
            out.append(token)
    return out


def image_spans(ids: Sequence[int], image_token: int) -> list[tuple[int, int]]:
    """The [start, end) of each run of image tokens in `ids`, in order (one run per image)."""
    spans = []
    start = None
    for index, token in enumerate(ids):
        if token == image_token:
            if start is None:
                start = index
        elif start is not None:
            spans.append((start, index))
            start = None
    if start is not None:
        spans.append((start, len(ids)))
    return spans


def chunk_ends(
    length: int,
    spans: Sequence[tuple[int, int]],
    chunk: int,
    start: int = 0,
    extra: Sequence[int] = (),
    margin: int = 1,
) -> list[int]:
    """Where to cut `ids[start:length]` into encoder calls of about `chunk` tokens, never inside an image's
    run nor within `margin` tokens of it (the model attends within an image both ways, so a run is encoded in
    one call, with its begin and end markers); `extra` ends are kept when they fall outside runs. The last
    end is `length`."""
    spans = [(max(begin - margin, 0), min(end + margin, length)) for begin, end in spans]

    def inside(position: int) -> tuple[int, int] | None:
        for begin, end in spans:
            if begin < position < end:
                return begin, end
        return None

    ends: set[int] = set()
    position = start
    while position < length:
        end = min(position + chunk, length)
        span = inside(end)
        if span is not None:
            end = span[0] if span[0] > position else span[1]
        ends.add(end)
        position = end
    for end in extra:
        if start < end < length and inside(end) is None:
            ends.add(end)
    return sorted(ends)
