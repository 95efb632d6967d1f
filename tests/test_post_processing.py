"""The models' post-processor normalises like anomalib's at the threshold but never ties scores."""

import torch
from anomalib.data import InferenceBatch
from anomalib.post_processing import PostProcessor

from anomalib_mdps.models import InvAD, Mdps
from anomalib_mdps.post_processing import RankPreservingPostProcessor


def _fitted(post_processor: PostProcessor, threshold: float) -> PostProcessor:
    """Validation statistics as anomalib's callbacks leave them: score range [0, 1], a threshold."""
    post_processor.image_min.fill_(0.0)
    post_processor.image_max.fill_(1.0)
    post_processor._image_threshold.fill_(threshold)  # noqa: SLF001 - the buffer anomalib fills
    return post_processor


def test_scores_far_above_a_low_threshold_keep_their_order() -> None:
    scores = torch.tensor([0.05, 0.3, 0.6, 0.95])
    ours = _fitted(RankPreservingPostProcessor(), threshold=-1.0)(InferenceBatch(pred_score=scores)).pred_score
    anomalib = _fitted(PostProcessor(), threshold=-1.0)(InferenceBatch(pred_score=scores)).pred_score
    assert torch.unique(anomalib).numel() == 1  # the clamp ties them all: any AUROC becomes 0.5
    assert (ours.diff() > 0).all()
    assert ((ours > 0) & (ours < 1)).all()


def test_the_threshold_maps_to_one_half_with_anomalib_slope() -> None:
    post_processor = _fitted(RankPreservingPostProcessor(), threshold=0.4)
    scores = torch.tensor([0.4, 0.401])
    normalized = post_processor(InferenceBatch(pred_score=scores)).pred_score
    assert normalized[0] == 0.5
    torch.testing.assert_close((normalized[1] - normalized[0]) / 0.001, torch.tensor(1.0), rtol=1e-2, atol=0)


def test_both_models_use_it() -> None:
    assert isinstance(Mdps(image_size=32, unet_channels=(32, 64)).post_processor, RankPreservingPostProcessor)
    assert isinstance(InvAD().post_processor, RankPreservingPostProcessor)
