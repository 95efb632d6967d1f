"""Attach this plugin's models to ``anomalib.models`` so bare names resolve everywhere.

anomalib's CLI (jsonargparse), ``get_model`` and the benchmark pipeline look models up as
attributes of ``anomalib.models``, in its ``__all__`` or among ``AnomalibModule``'s
subclasses; nothing else of anomalib is changed.
"""

import importlib
import sys
from types import ModuleType

PLUGIN_MODELS = ("Mdps", "InvAD", "Glad")
_PLUGIN_PACKAGE = "anomalib_mdps.models"


def register_models(models_module: ModuleType) -> None:
    """Make ``anomalib.models.<Name>`` resolve to the plugin's classes."""
    fallback = models_module.__dict__.get("__getattr__")

    def __getattr__(name: str):  # noqa: ANN202, N807
        if name in PLUGIN_MODELS:
            model_class = getattr(importlib.import_module(_PLUGIN_PACKAGE), name)
            setattr(models_module, name, model_class)
            return model_class
        if fallback is not None:
            return fallback(name)
        msg = f"module {models_module.__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)

    models_module.__getattr__ = __getattr__
    for name in PLUGIN_MODELS:
        if name not in models_module.__all__:
            models_module.__all__.append(name)
    plugin_is_importing = any(
        name.startswith("anomalib_mdps.") and name not in {"anomalib_mdps._startup", "anomalib_mdps.registry"}
        for name in sys.modules
    )
    if not plugin_is_importing:
        # Import now so lookups through AnomalibModule.__subclasses__() find the models too.
        # When a plugin module triggered this import, importing the models here would be
        # circular; the attribute hook above resolves them on first use instead.
        importlib.import_module(_PLUGIN_PACKAGE)
