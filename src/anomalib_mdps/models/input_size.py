"""Aspect-aware input sizes: the short side is given, the long side follows the data."""

from collections.abc import Sequence
from statistics import median

from PIL import Image, UnidentifiedImageError

from anomalib_mdps.data_checks import split_image_paths

# The aspect ratio is the median over this many images of the dataset (headers only are read).
ASPECT_SAMPLE = 32


def square(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from a pair, or (s, s) from a short side ``s`` until the data is seen."""
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))


def aspect_aware_size(short_side: int, aspect: float, factor: int) -> tuple[int, int]:
    """(height, width) with ``short_side`` on the shorter axis and height / width ≈ ``aspect``.

    The long side is rounded to a multiple of ``factor`` (what the model's networks can halve).
    """
    long_side = max(short_side, round(short_side * max(aspect, 1 / aspect) / factor) * factor)
    return (long_side, short_side) if aspect >= 1 else (short_side, long_side)


def size_for_data(datamodule: object, short_side: int, factor: int) -> tuple[int, int] | None:
    """The aspect-aware size for a datamodule's training (else test) images; ``None`` if unknown."""
    for split in ("train_data", "test_data"):
        aspects = []
        for path in split_image_paths(datamodule, split)[:ASPECT_SAMPLE]:
            try:
                with Image.open(path) as image:
                    aspects.append(image.height / image.width)
            except (OSError, UnidentifiedImageError):
                continue
        if aspects:
            return aspect_aware_size(short_side, median(aspects), factor)
    return None
