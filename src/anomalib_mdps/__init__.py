"""anomalib-mdps: diffusion-based anomaly detection models for anomalib."""

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202
    # Lazy, so `import anomalib_mdps` (done by the startup hook's callers) stays cheap.
    if name in {"Mdps", "InvAD", "Glad"}:
        from anomalib_mdps import models

        return getattr(models, name)
    raise AttributeError(name)
