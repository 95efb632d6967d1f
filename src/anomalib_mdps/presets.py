"""The presets shipped with the package (``anomalib_mdps/configs/*.yaml``), by name or by path.

    python -m anomalib_mdps.presets              # lists them
    python -m anomalib_mdps.presets mdps_cpu     # prints its path, for `anomalib train --config`

In a source checkout ``configs/`` at the repository root is a link to the same folder.
"""

import sys
from importlib.resources import files
from pathlib import Path


def preset_names() -> list[str]:
    return sorted(entry.name.removesuffix(".yaml") for entry in files("anomalib_mdps").joinpath("configs").iterdir()
                  if entry.name.endswith(".yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """The file of a preset given by name (``mdps_cpu``) or by path; a clear error naming the presets if neither."""
    given = Path(name_or_path)
    if given.suffix in {".yaml", ".yml"} and given.is_file():
        return given
    packaged = Path(str(files("anomalib_mdps").joinpath("configs", f"{given.name.removesuffix('.yaml')}.yaml")))
    if packaged.is_file():
        return packaged
    msg = f"No preset {str(name_or_path)!r}: give a YAML file's path or one of {', '.join(preset_names())}."
    raise FileNotFoundError(msg)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("\n".join(f"{name}\t{preset_path(name)}" for name in preset_names()))
        return 0
    try:
        print(preset_path(args[0]))
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
