"""The selection split (held-out normal training images plus synthetic defects) and what Mdps chooses on it."""

import pytest
import torch

from anomalib_mdps.components import PatchMemory
from anomalib_mdps.models.calibration import CalibrationHoldout
from anomalib_mdps.models.mdps.anomaly_map import choose_fusion, fusion_candidates
from anomalib_mdps.selection_split import DEFECT_KINDS, DEFECTS_PER_IMAGE, selection_split, synthetic_defect


def _normal_images(count: int = 5, size: tuple[int, int] = (48, 64)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    smooth = torch.nn.functional.interpolate(torch.rand(count, 3, 6, 8, generator=generator), size=size, mode="bilinear")
    return smooth * 0.5 + 0.25


def test_the_split_is_the_same_every_time_and_leaves_the_process_random_state_alone() -> None:
    images = _normal_images()
    state = torch.random.get_rng_state()
    first, second = selection_split(images, seed=0), selection_split(images, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(selection_split(images, seed=1).images, first.images)
    # The normal images as they are, then DEFECTS_PER_IMAGE defective copies of each, covering every kind.
    assert first.labels.tolist() == [0] * 5 + [1] * 5 * DEFECTS_PER_IMAGE
    assert torch.equal(first.images[:5], images) and not first.masks[:5].any()
    assert all(first.masks[5:].flatten(1).any(dim=1))


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_defect_changes_the_image_where_its_mask_is(kind: str) -> None:
    image = _normal_images(1)[0]
    defective, mask = synthetic_defect(image, kind, torch.Generator().manual_seed(11))
    change = (defective - image).abs().mean(dim=0)
    inside, outside = change[mask[0] > 0], change[mask[0] == 0]
    assert inside.numel() > 0 and inside.mean() > 0.01
    # Soft edges reach a pixel or two past the mask; nowhere else changes.
    assert outside.mean() < inside.mean() / 10


def test_defects_come_faint_and_bold() -> None:
    """The same spot drawn at the split's range of strengths: a faint one changes its pixels far less than a bold one."""
    from anomalib_mdps.selection_split import DEFECT_STRENGTH

    image = torch.full((3, 48, 64), 0.8)
    changes = []
    for seed in range(40):
        defective, mask = synthetic_defect(image, "spot", torch.Generator().manual_seed(seed))
        changes.append(float((defective - image).abs().mean(dim=0)[mask[0] > 0].mean()))
    low, high = DEFECT_STRENGTH
    assert min(changes) < 1.5 * low * max(changes) / high
    assert max(changes) > 0.8 * (0.8 - 0.13)  # a bold spot is nearly the spot's own colour


def test_defects_on_a_grayscale_image_stay_gray() -> None:
    gray = _normal_images(1)[0].mean(dim=0, keepdim=True).expand(3, -1, -1)
    for kind in DEFECT_KINDS:
        defective, _ = synthetic_defect(gray, kind, torch.Generator().manual_seed(2))
        assert torch.equal(defective[0], defective[1]) and torch.equal(defective[1], defective[2]), kind


def test_held_out_images_come_from_the_training_set_only() -> None:
    class Data:
        def __init__(self, paths: list[str]) -> None:
            import pandas as pd

            self.samples = pd.DataFrame({"image_path": paths})

        def __getitem__(self, index: int):  # noqa: ANN204
            return type("Item", (), {"image": torch.full((3, 4, 4), float(index))})()

    class DataModule:
        train_data = Data([f"/d/train/good/{i:03d}.png" for i in range(40)])
        test_data = Data([f"/d/test/good/{i:03d}.png" for i in range(40)])

    holdout = CalibrationHoldout(8, 6)
    holdout.choose(DataModule())
    assert len(holdout.calibration_keys) == 8 and len(holdout.selection_keys) == 6
    assert all(key.startswith("good/") for key in holdout.keys) and len(holdout.images) == 14
    selection = holdout.stacked(lambda image: image, "cpu", "selection")
    calibration = holdout.stacked(lambda image: image, "cpu")
    assert selection.shape == (6, 3, 4, 4) and not set(selection[:, 0, 0, 0].tolist()) & set(
        calibration[:, 0, 0, 0].tolist())


def _maps(separating: bool, count: int, generator: torch.Generator) -> torch.Tensor:
    """Maps of ``count`` normal then ``count`` defective images; a separating term lights the defect square."""
    maps = torch.randn(2 * count, 1, 16, 16, generator=generator)
    if separating:
        maps[count:, :, 4:8, 4:8] += 4
    return maps


def test_fusion_weighs_the_term_that_separates_the_defects() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 12 + [1] * 12)
    masks = torch.zeros(24, 1, 32, 32)
    masks[12:, :, 8:16, 8:16] = 1
    for informative in range(3):
        terms = [_maps(index == informative, 12, generator) for index in range(3)]
        choice = choose_fusion(terms, labels, masks, top_k=8)
        assert choice.coefficients[:, informative].min() >= 0.5, (informative, choice.coefficients)
        assert choice.metrics[0, informative] == 1.0 and choice.metrics[:, 3].min() >= 0.99
        assert choice.metrics[0, [i for i in range(3) if i != informative]].max() < 0.9
    # Without a term, it gets no weight and no metric.
    choice = choose_fusion([terms[0], terms[1], None], labels, masks, top_k=8)
    assert choice.coefficients[:, 2].abs().sum() == 0 and choice.metrics[:, 2].isnan().all()


def test_fusion_candidates_are_every_mix_in_tenths() -> None:
    candidates = torch.stack(fusion_candidates([True, True, True]))
    assert len(candidates) == 66 and torch.allclose(candidates.sum(dim=1), torch.ones(66))
    assert len(fusion_candidates([True, False, True])) == 11


def test_the_patch_memory_finds_a_normal_patch_wherever_it_moved() -> None:
    from anomalib_mdps.components import FeatureDensity

    generator = torch.Generator().manual_seed(5)
    # Normal embeddings: one pattern (a blob of one feature vector) at a random place in each image.
    pattern = torch.randn(8, 1, 1, generator=generator)

    def embedding(row: int, column: int) -> torch.Tensor:
        image = torch.randn(1, 8, 16, 16, generator=generator) * 0.05
        image[0, :, row : row + 4, column : column + 4] += pattern
        return image

    memory, density = PatchMemory(size=4096), FeatureDensity(channels=8, dims=8)
    for _ in range(20):
        normal = embedding(2, 2)
        memory.accumulate(normal)
        density.accumulate(normal)
    memory.fit()
    density.fit()
    moved = embedding(10, 10)
    novel = torch.randn(1, 8, 16, 16, generator=generator) * 0.05
    novel[0, :, 10:14, 10:14] += torch.randn(8, 1, 1, generator=generator)  # a pattern no normal image had
    assert memory.distance(moved).max() < 0.25 * memory.distance(novel).max()
    # The per-location Gaussian, fit where the pattern always sat, calls the moved pattern anomalous.
    far = density.distance(moved)[0, 0]
    assert far[10:14, 10:14].mean() > 5 * far[0:2, 12:14].mean()


def _image_scores(*columns: list[float]) -> list[torch.Tensor]:
    """One term per column: maps whose every pixel is the image's score, so the top-S mean is that score."""
    return [torch.tensor(column).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone() for column in columns]


def test_fusion_keeps_one_term_unless_a_mix_beats_it_by_more_than_the_noise() -> None:
    from anomalib_mdps.models.mdps.anomaly_map import auroc_standard_error

    normal = [i / 15 for i in range(16)]
    labels, masks = torch.tensor([0] * 16 + [1] * 32), torch.zeros(48, 1, 8, 8)
    masks[16:] = 1
    # The density ranks one defect below one normal image (AUROC 1 - 1/512); a little of the memory
    # would fix that pair. One pair in 512 is noise, so the density is kept alone.
    density = normal + [0.97] + [2.0] * 31
    memory = [0.0] * 16 + [10.0] + [0.0] * 31
    terms = [None, *_image_scores(density, memory)]
    assert auroc_standard_error(1 - 1 / 512, 16, 32) > 1 / 512
    simplest = choose_fusion(terms, labels, masks, top_k=8)
    assert simplest.coefficients[1].tolist() == [0.0, 1.0, 0.0], simplest.coefficients
    best = choose_fusion(terms, labels, masks, top_k=8, simplest_within_noise=False)
    assert best.coefficients[1, 2] > 0 and float(best.metrics[0, 3]) == 1.0, best.coefficients
    # Each term sees half of the defects: alone each scores about 0.75, their mix 1.0, far beyond the noise.
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 48, generator=generator) * 0.5
    first, second = noise[0].clone(), noise[1].clone()
    first[16:32] += 2
    second[32:] += 2
    mixed = choose_fusion([None, *_image_scores(first.tolist(), second.tolist())], labels, masks, top_k=8)
    assert mixed.coefficients[1, 1] > 0 and mixed.coefficients[1, 2] > 0, mixed.coefficients
    assert mixed.metrics[0, 1:3].max() < 0.85 and float(mixed.metrics[0, 3]) == 1.0


def test_the_auroc_standard_error_matches_the_spread_of_simulated_aurocs() -> None:
    from sklearn.metrics import roc_auc_score

    from anomalib_mdps.models.mdps.anomaly_map import auroc_standard_error

    generator = torch.Generator().manual_seed(1)
    normal, defective, shift = 16, 32, 1.5
    labels = [0] * normal + [1] * defective
    aurocs = torch.tensor([
        roc_auc_score(labels, torch.cat([torch.randn(normal, generator=generator),
                                         torch.randn(defective, generator=generator) + shift]).numpy())
        for _ in range(2000)
    ])
    expected = auroc_standard_error(float(aurocs.mean()), normal, defective)
    # Hanley and McNeil's approximation is within about 10 % for two normal distributions.
    assert abs(float(aurocs.std()) - expected) < 0.15 * expected, (float(aurocs.std()), expected)
