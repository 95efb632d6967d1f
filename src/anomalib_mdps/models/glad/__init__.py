"""GLAD: global and local adaptive diffusion, in pixel space on the plugin's prior."""

from .lightning_model import Glad
from .torch_model import GladModel, GladOutput

__all__ = ["Glad", "GladModel", "GladOutput"]
