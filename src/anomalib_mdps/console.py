"""Console hygiene for the plugin's command-line tools."""

import re
import warnings

# Deprecation notices about the libraries' own internals: timm's and anomalib's imports when
# anomalib loads its model zoo, and Lightning's use of torch's pytree during training. Nothing a
# user of these tools can act on.
LIBRARY_IMPORT_WARNINGS = (
    "Importing from timm.models.layers is deprecated",
    "The anomalib.models.components.dinov2 package is deprecated",
    "`isinstance(treespec, LeafSpec)` is deprecated",
)


def hide_library_import_warnings() -> None:
    """Silence ``LIBRARY_IMPORT_WARNINGS``; call before anomalib is imported."""
    for message in LIBRARY_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=FutureWarning)
