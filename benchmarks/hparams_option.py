"""The `--hparams` option that the benchmark scripts share, and the run folder it implies."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any


def add_hparams_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hparams", type=json.loads, default={}, help="JSON overrides for every method"
    )


def hparams_folder(folder: Path, hparams: dict[str, Any]) -> Path:
    """`folder`, or a sibling named after the overrides: `run_bench` refuses to resume a run
    folder with other settings, so each setting gets a folder of its own."""
    if not hparams:
        return folder
    digest = hashlib.sha1(json.dumps(hparams, sort_keys=True).encode()).hexdigest()
    return folder.with_name(f"{folder.name}-h{digest[:8]}")
