"""Each anomalib module re-declares its torch model's arguments (the CLI reads signatures): they must
stay the same arguments, with the same defaults, all passed through.
"""

import inspect

import pytest
from torch import nn

from anomalib_mdps.models import Glad, InvAD, Mdps
from anomalib_mdps.models.glad.torch_model import GladModel
from anomalib_mdps.models.invad.torch_model import InvADModel
from anomalib_mdps.models.mdps.torch_model import MdpsModel

# image_size differs on purpose: the modules take an integer short side (aspect-aware), the torch
# models a (height, width) pair.
DIFFERENT_BY_DESIGN = {"self", "image_size"}

PAIRS = [
    pytest.param(Mdps, MdpsModel, "anomalib_mdps.models.mdps.lightning_model.MdpsModel", id="Mdps"),
    pytest.param(InvAD, InvADModel, "anomalib_mdps.models.invad.lightning_model.InvADModel", id="InvAD"),
    pytest.param(Glad, GladModel, "anomalib_mdps.models.glad.lightning_model.GladModel", id="Glad"),
]


def _torch_arguments(torch_model: type) -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(torch_model.__init__).parameters
    return {name: parameter for name, parameter in parameters.items() if name not in DIFFERENT_BY_DESIGN}


@pytest.mark.parametrize(("module", "torch_model", "_"), PAIRS)
def test_the_module_declares_every_torch_model_argument_with_its_default(module, torch_model, _) -> None:  # noqa: ANN001
    declared = inspect.signature(module.__init__).parameters
    missing = sorted(set(_torch_arguments(torch_model)) - set(declared))
    assert not missing, f"{module.__name__} does not expose {missing}"
    drifted = {
        name: (declared[name].default, parameter.default)
        for name, parameter in _torch_arguments(torch_model).items()
        if declared[name].default != parameter.default
    }
    assert not drifted, f"{module.__name__} defaults differ from {torch_model.__name__}'s: {drifted}"


@pytest.mark.parametrize(("module", "torch_model", "target"), PAIRS)
def test_the_module_passes_every_argument_through(module, torch_model, target, monkeypatch) -> None:  # noqa: ANN001
    received = {}

    def recording_model(**kwargs) -> nn.Module:  # noqa: ANN003
        received.update(kwargs)
        return nn.Identity()

    monkeypatch.setattr(target, recording_model)
    sentinels = {name: object() for name in _torch_arguments(torch_model)}
    module(**sentinels, pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
    wrong = sorted(name for name, value in sentinels.items() if received.get(name) is not value)
    assert not wrong, f"{module.__name__} does not pass {wrong} to {torch_model.__name__} as given"
