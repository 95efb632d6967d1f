"""Aspect-aware input sizes: the short side is given, the long side follows the data."""

from collections.abc import Sequence
from functools import partial
from statistics import median

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

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


def track_input_size(model: nn.Module) -> None:
    """Save ``model``'s (height, width) with its weights (an ``input_size`` buffer, which its
    ``set_image_size`` keeps up to date), and make weights saved at another size (an aspect-aware
    run) bring that size with them when loaded.
    """
    model.register_buffer("input_size", torch.zeros(2, dtype=torch.long))
    # A partial of a module-level function, not a closure: exported torch models are pickled.
    model._register_load_state_dict_pre_hook(partial(_resize_to_saved_input, model))  # noqa: SLF001


def _resize_to_saved_input(model: nn.Module, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
    del args, kwargs
    saved = state_dict.get(f"{prefix}input_size")
    if saved is not None and saved.numel() == 2 and tuple(saved.tolist()) != model.image_size:
        model.set_image_size(saved.tolist())
