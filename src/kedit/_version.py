"""The package's version: its one source, read by pyproject.toml and re-exported by `kedit`."""

__version__ = "0.1.0"
