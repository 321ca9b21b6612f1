"""Facts for the mechanism benchmarks (imported by trace_fidelity.py, circuit_fidelity.py,
mechanisms_speed.py, locate_quality.py, mechanisms_edit.py; not a benchmark itself).

By default the facts of tinyworld's "lives_in" relation asked with its first template
("{} lives in"), in world order, which the bundled models and tiny-chat learnt; `--data` reads
any file `kedit.data.facts.load_facts` reads (an LRE relation, a benchmark file, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_fact_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-gpt2", help="bundled name, folder or hub id")
    parser.add_argument("--data", type=Path, default=None, help="facts file (default tinyworld)")
    parser.add_argument("--relation", default="lives_in", help="tinyworld relation")
    parser.add_argument("--template", type=int, default=0, help="tinyworld template index")


def candidate_facts(args: argparse.Namespace) -> list[Any]:
    from kedit.analysis import tinyworld_facts
    from kedit.data.facts import load_facts

    if args.data is not None:
        return list(load_facts(args.data))
    return tinyworld_facts(args.relation, args.template)


def describe(args: argparse.Namespace) -> str:
    if args.data is not None:
        return str(args.data)
    return f"tinyworld {args.relation}, template {args.template}"
