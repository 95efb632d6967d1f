"""A small synthetic inspection dataset in MVTec AD's or BTAD's layout, made on the spot (no download).

Normal parts are a machined metal washer (brushed-metal texture, a bore, a chamfer ring) on a
dark fabric-like background, with small pose and lighting jitter. Anomalous parts carry one of
the defects line inspection sees: a thin scratch, a dark spot (pit or stain), a missing piece
broken off the rim, or contamination (a fibre or smear of foreign colour), each with its mask.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFECTS = ("scratch", "spot", "missing_piece", "contamination")
MARKER = ".anomalib_mdps_demo"
# Folder names and file types of each layout: MVTec AD (anomalib's ``MVTecAD``) keeps one folder per
# defect type; BTAD (anomalib's ``BTech``) keeps all defects in ``ko``, its images as .bmp and masks named
# like their image, as .png.
LAYOUTS = {
    "mvtec": {"normal": "good", "normal_image": "{index:03d}.png", "defective": "{defect}",
              "image": "{index:03d}.png", "mask": "{index:03d}_mask.png"},
    "btad": {"normal": "ok", "normal_image": "{index:03d}.bmp", "defective": "ko",
             "image": "{defect}_{index:03d}.bmp", "mask": "{defect}_{index:03d}.png"},
}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size] / size


def _washer_geometry(rng: np.random.Generator) -> dict[str, float]:
    return {
        "cx": 0.5 + rng.normal(0, 0.01),
        "cy": 0.5 + rng.normal(0, 0.01),
        "outer": 0.36 + rng.normal(0, 0.004),
        "inner": 0.13 + rng.normal(0, 0.003),
        "light": 1.0 + rng.normal(0, 0.03),
        "angle": rng.uniform(0, 2 * np.pi),
    }


def _render(geometry: dict[str, float], size: int, rng: np.random.Generator, missing: np.ndarray | None = None) -> np.ndarray:
    yy, xx = _grid(size)
    background = 0.16 + 0.025 * np.sin(14 * np.pi * (xx + 0.5 * yy)) * np.sin(12 * np.pi * (yy - 0.3 * xx))
    image = np.stack([background, background * 1.05, background * 1.12], axis=-1)
    dx, dy = xx - geometry["cx"], yy - geometry["cy"]
    radius = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx) + geometry["angle"]
    metal = radius < geometry["outer"]
    metal &= radius > geometry["inner"]
    if missing is not None:
        metal &= ~missing
    # Brushed metal: concentric fine grooves and a soft directional highlight.
    grooves = 0.03 * np.sin(radius * 80)
    highlight = 0.18 * np.cos(theta - 0.8) * (radius / geometry["outer"])
    chamfer = 0.12 * np.exp(-(((radius - geometry["outer"] * 0.9) / 0.012) ** 2))
    shade = (0.58 + grooves + highlight + chamfer) * geometry["light"]
    shade = shade + rng.normal(0, 0.004, shade.shape)
    washer = shade[..., None] * np.array([0.92, 0.94, 1.0])
    return np.where(metal[..., None], washer, image)


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))


def _point_on_metal(rng: np.random.Generator, geometry: dict[str, float], low: float, high: float) -> tuple[float, float]:
    angle = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(geometry["inner"] + low, geometry["outer"] - high)
    return geometry["cx"] + radius * np.cos(angle), geometry["cy"] + radius * np.sin(angle)


def _defective_part(rng: np.random.Generator, size: int, defect: str) -> tuple[Image.Image, Image.Image]:
    geometry = _washer_geometry(rng)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if defect == "missing_piece":
        angle = rng.uniform(0, 2 * np.pi)
        depth = rng.uniform(0.09, 0.13)
        cx = geometry["cx"] + (geometry["outer"] + 0.02) * np.cos(angle)
        cy = geometry["cy"] + (geometry["outer"] + 0.02) * np.sin(angle)
        points = [
            ((cx + depth * np.cos(a) * rng.uniform(0.7, 1.3)) * size, (cy + depth * np.sin(a) * rng.uniform(0.7, 1.3)) * size)
            for a in np.linspace(0, 2 * np.pi, 9)[:-1]
        ]
        chip = Image.new("L", (size, size), 0)
        ImageDraw.Draw(chip).polygon(points, fill=255)
        chipped = np.asarray(chip) > 0
        image = _to_image(_render(geometry, size, rng, missing=chipped))
        intact = _render(geometry, size, np.random.default_rng(0))
        difference = np.abs(np.asarray(image, dtype=float) / 255 - intact).mean(axis=-1) > 0.08
        return image, Image.fromarray(((chipped & difference) * 255).astype(np.uint8))
    image = _to_image(_render(geometry, size, rng))
    if defect == "scratch":
        x0, y0 = _point_on_metal(rng, geometry, 0.03, 0.05)
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.12, 0.2)
        bend = rng.normal(0, 0.03, 2)
        t = np.linspace(0, 1, 12)
        xs = x0 + np.cos(angle) * length * t + bend[0] * np.sin(np.pi * t)
        ys = y0 + np.sin(angle) * length * t + bend[1] * np.sin(np.pi * t)
        draw.line(list(zip(xs * size, ys * size, strict=True)), fill=255, width=max(2, size // 28))
        colour = (200, 205, 215) if rng.uniform() < 0.5 else (45, 45, 50)
    elif defect == "spot":
        cx, cy = _point_on_metal(rng, geometry, 0.05, 0.06)
        r = rng.uniform(0.035, 0.055)
        points = [
            ((cx + r * np.cos(a) * rng.uniform(0.7, 1.2)) * size, (cy + r * np.sin(a) * rng.uniform(0.7, 1.2)) * size)
            for a in np.linspace(0, 2 * np.pi, 10)[:-1]
        ]
        draw.polygon(points, fill=255)
        colour = (40, 32, 26)
    else:  # contamination: a curled fibre or a smear of foreign colour
        cx, cy = _point_on_metal(rng, geometry, 0.04, 0.05)
        if rng.uniform() < 0.5:
            t = np.linspace(0, 1, 16)
            xs = cx + 0.08 * np.cos(3 * t + rng.uniform(0, 6)) * t
            ys = cy + 0.08 * np.sin(2.5 * t + rng.uniform(0, 6)) * t
            draw.line(list(zip(xs * size, ys * size, strict=True)), fill=255, width=max(2, size // 32))
        else:
            r = rng.uniform(0.045, 0.07)
            draw.ellipse(((cx - r) * size, (cy - r * 0.6) * size, (cx + r) * size, (cy + r * 0.6) * size), fill=255)
        colour = (150, 95, 40)
    soft = mask.filter(ImageFilter.GaussianBlur(0.8))
    image = Image.composite(Image.new("RGB", image.size, colour), image, soft)
    return image, mask


def make_demo_dataset(root: Path, category: str = "demo", size: int = 128, num_train: int = 80, seed: int = 0,
                      layout: str = "mvtec") -> Path:
    """Write the dataset under ``root/category`` in ``layout`` (a key of ``LAYOUTS``) and return ``root``.

    An existing folder is reused only if this function made it; anything else is left
    untouched and reported, so no user data is ever overwritten.
    """
    if layout not in LAYOUTS:
        msg = f"Unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}."
        raise ValueError(msg)
    names = LAYOUTS[layout]
    target = Path(root) / category
    if target.exists():
        if (target / MARKER).exists():
            return Path(root)
        msg = f"{target} exists and was not made by anomalib-mdps; choose another --root."
        raise FileExistsError(msg)
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("test", 16)):
        folder = target / split / names["normal"]
        folder.mkdir(parents=True)
        for index in range(count):
            _to_image(_render(_washer_geometry(rng), size, rng)).save(folder / names["normal_image"].format(index=index))
    for defect in DEFECTS:
        folder_name = names["defective"].format(defect=defect)
        images, masks = target / "test" / folder_name, target / "ground_truth" / folder_name
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for index in range(6):
            image, mask = _defective_part(rng, size, defect)
            image.save(images / names["image"].format(defect=defect, index=index))
            mask.save(masks / names["mask"].format(defect=defect, index=index))
    (target / MARKER).touch()
    return Path(root)
