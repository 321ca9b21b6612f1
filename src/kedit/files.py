"""Reading the user's text files with errors that name the file and the option it came from."""

from __future__ import annotations

from pathlib import Path


def read_text(path: str | Path, field: str) -> str:
    """The UTF-8 text of `path`; a missing file or bytes that are not UTF-8 raise an error
    that names `field` (the option or argument the path was given as) and the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{field}: {str(path)!r} is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{field}: {str(path)!r} is not UTF-8 text (byte {data[error.start]:#04x} at line "
            f"{line}); save it as UTF-8"
        ) from None
