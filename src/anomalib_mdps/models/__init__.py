"""The plugin's anomalib models."""

from .glad import Glad
from .invad import InvAD
from .mdps import Mdps

__all__ = ["Glad", "InvAD", "Mdps"]
