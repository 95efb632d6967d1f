"""Each model's settings are declared once, by its torch model; the anomalib module takes them as
``**model_settings``, and the CLI (jsonargparse follows the forwarding) lists each with its default.
"""

import inspect

import pytest
from jsonargparse import ArgumentParser

from anomalib_mdps.models import Glad, InvAD, Mdps
from anomalib_mdps.models.glad.torch_model import GladModel
from anomalib_mdps.models.invad.torch_model import InvADModel
from anomalib_mdps.models.mdps.torch_model import MdpsModel

PAIRS = [
    pytest.param(Mdps, MdpsModel, id="Mdps"),
    pytest.param(InvAD, InvADModel, id="InvAD"),
    pytest.param(Glad, GladModel, id="Glad"),
]
NO_COMPONENTS = {"pre_processor": False, "post_processor": False, "evaluator": False, "visualizer": False}


def _settings(torch_model: type) -> dict[str, inspect.Parameter]:
    """The torch model's own settings; ``image_size`` is the module's (an integer there is a short side)."""
    parameters = inspect.signature(torch_model).parameters
    return {name: parameter for name, parameter in parameters.items() if name != "image_size"}


@pytest.mark.parametrize(("module", "torch_model"), PAIRS)
def test_the_command_line_lists_every_torch_model_setting_with_its_default(module, torch_model) -> None:  # noqa: ANN001
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(module, "model")
    defaults = vars(parser.get_defaults().model)
    missing = sorted(set(_settings(torch_model)) - set(defaults))
    assert not missing, f"the CLI does not list {missing} for {module.__name__}"
    drifted = {name: (defaults[name], parameter.default) for name, parameter in _settings(torch_model).items()
               if defaults[name] != parameter.default}
    assert not drifted, drifted


@pytest.mark.parametrize(("module", "torch_model"), PAIRS)
def test_a_setting_given_to_the_module_reaches_the_torch_model(module, torch_model) -> None:  # noqa: ANN001
    del torch_model
    assert module(image_size=32, seed=5, **NO_COMPONENTS).model.seed == 5
    with pytest.raises(TypeError, match="num_sampels"):
        module(image_size=32, num_sampels=8, **NO_COMPONENTS)


def test_the_command_line_parses_a_torch_model_setting() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Mdps, "model")
    parsed = parser.parse_args(["--model.num_samples", "7", "--model.mask_quantile", "0.5"])
    model = Mdps(**{**vars(parsed.model), **NO_COMPONENTS}).model
    assert (model.num_samples, model.mask_quantile) == (7, 0.5)
