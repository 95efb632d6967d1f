"""The selection split: held-out normal training images and copies of them with synthetic defects.

Settings that a model chooses while it trains (``Mdps(score_fusion="auto")``) and the ablation
harness's choices are made on this split, never on a test set. It is one recipe for every
dataset: each held-out image appears once as it is and ``DEFECTS_PER_IMAGE`` times with a defect
of the kinds line inspection sees (the demo data's scratch, spot, missing piece and
contamination, drawn here on any image), and anomalib's Perlin anomaly. The defects are drawn
from a generator seeded by the image's position and the split's seed, so the split is the same
on every machine and in every run; the process-wide random state is left as it was.

anomalib's ``ValSplitMode.SYNTHETIC`` is not used: it makes a validation set only when the user's
datamodule asks for it (MVTec AD's default validates on the test set), only with Perlin
anomalies, and the model cannot see it while it trains.
"""

import math
from typing import NamedTuple

import torch

DEFECT_KINDS = ("scratch", "spot", "missing_piece", "contamination", "perlin")
DEFECTS_PER_IMAGE = 2
# Opacity of a defect, drawn uniformly per defect: faint ones too, so that the split ranks terms by how
# early they see a defect instead of saturating (every term scoring 1.0) on bold ones.
DEFECT_STRENGTH = (0.25, 1.0)
# Colours of the drawn defects (RGB in [0, 1]); on grayscale images their luminance is drawn.
LIGHT_SCRATCH, DARK_SCRATCH = (0.80, 0.81, 0.84), (0.18, 0.18, 0.20)
DARK_SPOT = (0.16, 0.13, 0.10)
FOREIGN_COLOURS = ((0.59, 0.37, 0.16), (0.25, 0.45, 0.20), (0.70, 0.65, 0.30))


class SelectionSplit(NamedTuple):
    """Images (N, 3, H, W) in [0, 1], image labels (N,) with 1 = defect, and masks (N, 1, H, W)."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


def selection_split(normal_images: torch.Tensor, seed: int = 0) -> SelectionSplit:
    """The normal images as they are, then ``DEFECTS_PER_IMAGE`` defective copies of each."""
    images, masks = [normal_images], [torch.zeros_like(normal_images[:, :1])]
    labels = [torch.zeros(len(normal_images), dtype=torch.long)]
    for index, image in enumerate(normal_images.cpu()):
        for copy in range(DEFECTS_PER_IMAGE):
            kind = DEFECT_KINDS[(index * DEFECTS_PER_IMAGE + copy) % len(DEFECT_KINDS)]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index * DEFECTS_PER_IMAGE + copy)
            defective, mask = synthetic_defect(image, kind, generator)
            images.append(defective.unsqueeze(0).to(normal_images.device))
            masks.append(mask.unsqueeze(0).to(normal_images.device))
            labels.append(torch.ones(1, dtype=torch.long))
    return SelectionSplit(torch.cat(images), torch.cat(labels).to(normal_images.device), torch.cat(masks))


def synthetic_defect(image: torch.Tensor, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One defect of ``kind`` on ``image`` (3, H, W) in [0, 1]: the image and its mask (1, H, W) of 0/1."""
    if kind not in DEFECT_KINDS:
        msg = f"Unknown defect kind {kind!r}; choose one of {DEFECT_KINDS}."
        raise ValueError(msg)
    strength = _uniform(generator, *DEFECT_STRENGTH)
    if kind == "perlin":
        defective, coverage = _perlin(image, generator, strength)
    else:
        coverage, paint = _DRAWN[kind](image, generator)
        alpha = coverage * strength
        defective = image * (1 - alpha) + paint * alpha
    if _is_gray(image):
        defective = defective.mean(dim=0, keepdim=True).expand_as(image)
    mask = (coverage > 0.5).float()
    if not mask.any():  # a defect thinner than half a pixel everywhere: mark its strongest pixels
        mask = (coverage >= coverage.max() * 0.5).float() * (coverage.max() > 0)
    return defective.clamp(0, 1), mask


def _is_gray(image: torch.Tensor) -> bool:
    return bool((image[0] == image[1]).all() and (image[1] == image[2]).all())


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _polyline_alpha(points: torch.Tensor, width: float, height_px: int, width_px: int) -> torch.Tensor:
    """(1, H, W) soft coverage of a polyline (points in pixels, (n, 2) as x, y) of ``width`` pixels."""
    ys, xs = torch.meshgrid(torch.arange(height_px, dtype=torch.float32), torch.arange(width_px, dtype=torch.float32),
                            indexing="ij")
    pixels = torch.stack([xs, ys], dim=-1).reshape(-1, 1, 2)
    start, end = points[:-1].unsqueeze(0), points[1:].unsqueeze(0)
    direction = end - start
    t = ((pixels - start) * direction).sum(-1) / (direction * direction).sum(-1).clamp(min=1e-6)
    nearest = start + t.clamp(0, 1).unsqueeze(-1) * direction
    distance = (pixels - nearest).norm(dim=-1).min(dim=1).values.reshape(1, height_px, width_px)
    return (width / 2 + 0.5 - distance).clamp(0, 1)


def _blob_alpha(
    centre: tuple[float, float], radius: float, generator: torch.Generator, size: tuple[int, int], elongation: float = 1.0,
) -> torch.Tensor:
    """(1, H, W) soft coverage of an irregular blob (radius in pixels, wobbling with the angle)."""
    height, width = size
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    dx, dy = xs - centre[0], (ys - centre[1]) * elongation
    angle = torch.atan2(dy, dx)
    wobble = torch.zeros_like(angle)
    for harmonic in (2, 3, 5):
        wobble += 0.12 * torch.cos(harmonic * angle + _uniform(generator, 0, 2 * math.pi))
    return (radius * (1 + wobble) + 0.5 - torch.hypot(dx, dy)).clamp(0, 1).unsqueeze(0)


def _point(generator: torch.Generator, size: tuple[int, int], margin: float) -> tuple[float, float]:
    """A random (x, y) in pixels, ``margin`` (a fraction of each side) away from the border."""
    return (_uniform(generator, margin, 1 - margin) * size[1], _uniform(generator, margin, 1 - margin) * size[0])


def _colour(rgb: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rgb, dtype=like.dtype).view(3, 1, 1).expand_as(like)


def _scratch(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    size = tuple(image.shape[-2:])
    short = min(size)
    x0, y0 = _point(generator, size, 0.15)
    angle, length = _uniform(generator, 0, math.pi), _uniform(generator, 0.12, 0.3) * short
    bend = _uniform(generator, -0.08, 0.08) * short
    t = torch.linspace(0, 1, 12)
    xs = x0 + math.cos(angle) * length * t - math.sin(angle) * bend * torch.sin(math.pi * t)
    ys = y0 + math.sin(angle) * length * t + math.cos(angle) * bend * torch.sin(math.pi * t)
    alpha = _polyline_alpha(torch.stack([xs, ys], dim=1), max(1.5, _uniform(generator, 0.01, 0.025) * short), *size)
    colour = LIGHT_SCRATCH if _uniform(generator, 0, 1) < 0.5 else DARK_SCRATCH
    return alpha, _colour(colour, image)


def _spot(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    size = tuple(image.shape[-2:])
    radius = _uniform(generator, 0.025, 0.06) * min(size)
    alpha = _blob_alpha(_point(generator, size, 0.1), radius, generator, size)
    return alpha, _colour(DARK_SPOT, image)


def _missing_piece(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A piece replaced by another part of the same image (what shows through where it broke off)."""
    size = tuple(image.shape[-2:])
    radius = _uniform(generator, 0.05, 0.1) * min(size)
    alpha = _blob_alpha(_point(generator, size, 0.12), radius, generator, size)
    shift = (round(_uniform(generator, 0.25, 0.5) * size[0]), round(_uniform(generator, 0.25, 0.5) * size[1]))
    return alpha, torch.roll(image, shifts=shift, dims=(-2, -1))


def _contamination(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A curled fibre or a smear of a foreign colour."""
    size = tuple(image.shape[-2:])
    short = min(size)
    x0, y0 = _point(generator, size, 0.15)
    colour = FOREIGN_COLOURS[int(torch.randint(len(FOREIGN_COLOURS), (), generator=generator))]
    if _uniform(generator, 0, 1) < 0.5:
        t = torch.linspace(0, 1, 16)
        reach = _uniform(generator, 0.08, 0.15) * short
        xs = x0 + reach * torch.cos(3 * t + _uniform(generator, 0, 6)) * t
        ys = y0 + reach * torch.sin(2.5 * t + _uniform(generator, 0, 6)) * t
        alpha = _polyline_alpha(torch.stack([xs, ys], dim=1), max(1.5, _uniform(generator, 0.008, 0.02) * short), *size)
    else:
        alpha = _blob_alpha((x0, y0), _uniform(generator, 0.04, 0.08) * short, generator, size, elongation=1.6)
    return alpha, _colour(colour, image)


_DRAWN = {"scratch": _scratch, "spot": _spot, "missing_piece": _missing_piece, "contamination": _contamination}


def _perlin(image: torch.Tensor, generator: torch.Generator, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """anomalib's Perlin anomaly (noise texture, augmented and blended at ``strength``), under a seed of its own."""
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

    seed = int(torch.randint(2**31 - 1, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        perlin = PerlinAnomalyGenerator(probability=1.0, blend_factor=strength)
        defective, mask = perlin(image.float())
    return defective.to(image.dtype), mask.to(image.dtype)
