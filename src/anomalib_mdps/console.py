"""Console hygiene for the plugin's command-line tools."""

import warnings

# Deprecation notices that timm and anomalib raise about their own internal imports when
# anomalib loads its model zoo: nothing a user of these tools can act on.
LIBRARY_IMPORT_WARNINGS = (
    "Importing from timm.models.layers is deprecated",
    "The anomalib.models.components.dinov2 package is deprecated",
)


def hide_library_import_warnings() -> None:
    """Silence ``LIBRARY_IMPORT_WARNINGS``; call before anomalib is imported."""
    for message in LIBRARY_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
