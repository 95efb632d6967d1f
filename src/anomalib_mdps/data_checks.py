"""What the plugin reads from anomalib datamodules: their image lists, and clear, early errors for
datasets that are missing or hold unreadable files.

anomalib's datamodules (MVTecAD, Kolektor, VisA, ...) download a dataset that is not under their
``root`` in ``prepare_data``: gigabytes from the internet, or a bare ``URLError`` offline. This
plugin runs offline, so for its models a missing dataset is an error that says where to put it.
"""

import sys
from pathlib import Path
from typing import NoReturn
from unittest import mock


def split_image_paths(datamodule: object, split: str) -> list[str]:
    """The image paths of a datamodule's ``split`` dataset ("train_data", "test_data", ...); [] if none."""
    samples = getattr(getattr(datamodule, split, None), "samples", None)
    if samples is None or "image_path" not in samples:
        return []
    return list(samples["image_path"])


class DatasetNotFoundError(FileNotFoundError):
    """A datamodule's data is not on disk, and this plugin does not download it."""


def refuse_dataset_download(datamodule: object) -> None:
    """Make this ``datamodule``'s ``prepare_data`` raise a clear error where it would download.

    Only this instance changes: its ``prepare_data`` runs with its module's ``download_and_extract``
    replaced for the length of the call, so other datamodules and later code see anomalib as it is.
    """
    module = sys.modules.get(type(datamodule).__module__)
    if module is None or not hasattr(module, "download_and_extract") or vars(datamodule).get("_offline_prepare"):
        return
    name = type(datamodule).__name__
    category = getattr(datamodule, "category", None)

    def refuse(root: Path, *args: object, **kwargs: object) -> NoReturn:
        del args, kwargs
        where = Path(root) / category if category else Path(root)
        msg = (
            f"{name} data not found at {where}. anomalib-mdps never downloads data: put the dataset "
            f"there or point --data.root at it."
        )
        raise DatasetNotFoundError(msg)

    prepare = datamodule.prepare_data

    def prepare_data_offline() -> None:
        with mock.patch.object(module, "download_and_extract", refuse):
            prepare()

    datamodule.prepare_data = prepare_data_offline
    datamodule._offline_prepare = True


class UnreadableImageError(OSError):
    """Files of a dataset that cannot be read as images."""


# The datasets each Lightning stage reads.
STAGE_SPLITS = {"fit": ("train_data", "val_data"), "validate": ("val_data",), "test": ("test_data",)}


def check_dataset_images(datamodule: object, stage: str, shown: int = 5) -> None:
    """Raise, naming the files, if any image of the datasets ``stage`` reads cannot be read.

    anomalib reads images lazily in the data loader, where a corrupt file ends training with a
    decoder message that does not name it ("Truncated File Read"). Checking every file's structure
    (PIL's ``verify``: headers and chunk checksums, no decoding) costs milliseconds per image.
    """
    from PIL import Image

    paths = [path for split in STAGE_SPLITS.get(stage, ()) for path in split_image_paths(datamodule, split)]
    unreadable = []
    for path in dict.fromkeys(paths):
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
            unreadable.append(f"{path} ({type(error).__name__}: {error})")
    if unreadable:
        more = f" and {len(unreadable) - shown} more" if len(unreadable) > shown else ""
        msg = f"Cannot read {len(unreadable)} image file(s): " + "; ".join(unreadable[:shown]) + more
        msg += ". Replace or remove them."
        raise UnreadableImageError(msg)
