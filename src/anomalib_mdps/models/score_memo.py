"""Scores of a validation pass, reused by a test pass over the same images with the same weights.

anomalib's MVTec AD, MVTec 3D and KolektorSDD datamodules validate on the test set, so
``Engine.fit`` followed by ``Engine.test`` would sample every test image twice. A diffusion
model's score of an image depends only on the image and the model's tensors (its sampling
noise is drawn once and shared by all images), so the second pass can read the first's.
"""

import hashlib
from enum import Enum

import torch
from torch import nn

# Fields that ``score_batch`` sets on a batch.
SCORE_FIELDS = ("pred_score", "anomaly_map", "reconstruction", "score_terms")


def model_state(module: nn.Module) -> tuple:
    """Where each parameter and buffer lives, how often it was changed in place, and the settings.

    An optimiser or EMA step, ``load_state_dict``, calibration and ``.to(device)`` all change
    a tensor's storage or its version counter; settings (N_s, ρ, ...) are plain attributes.
    Equal states mean the same scores. (Writes through ``tensor.data`` bypass version counters:
    call ``ScoreMemo.clear`` after those.)
    """
    everything = (*module.parameters(), *module.buffers())
    tensors = tuple((tensor.data_ptr(), tensor._version) for tensor in everything)  # noqa: SLF001
    settings = tuple(
        (name, value) for name, value in sorted(vars(module).items())
        if isinstance(value, int | float | str | bool | tuple | Enum) and not name.startswith("_")
    )
    return tensors, settings


def image_key(image: torch.Tensor) -> str:
    """A digest of one pre-processed image's values (and shape)."""
    data = image.detach().float().cpu().contiguous()
    digest = hashlib.blake2b(str(tuple(data.shape)).encode(), digest_size=16)
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


class ScoreMemo:
    """Per-image outputs of the last validation pass, valid while the model's tensors are unchanged."""

    def __init__(self) -> None:
        self._outputs: dict[str, dict[str, torch.Tensor]] = {}
        self._state: tuple | None = None

    def __len__(self) -> int:
        return len(self._outputs)

    def clear(self) -> None:
        self._outputs.clear()
        self._state = None

    def remember(self, module: nn.Module, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        """Keep each image's outputs: copies (post-processors may rewrite the batch in place), in host
        memory (a validation set's maps and reconstructions need not hold accelerator memory).
        """
        state = model_state(module)
        if state != self._state:
            self.clear()
            self._state = state
        for index, image in enumerate(images):
            kept = {name: value[index].detach().to("cpu", copy=True) for name, value in outputs.items()}
            self._outputs[image_key(image)] = kept

    def recall(self, module: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The batch's outputs if every image was scored by the model as it is now, else ``None``."""
        if not self._outputs or model_state(module) != self._state:
            return None
        entries = [self._outputs.get(image_key(image)) for image in images]
        if any(entry is None for entry in entries):
            return None
        return {name: torch.stack([entry[name] for entry in entries]).to(images.device) for name in entries[0]}
