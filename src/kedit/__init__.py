"""kedit: locate, edit, erase and explain knowledge inside transformer language models."""

from kedit._version import __version__ as __version__
from kedit.api import apply, edit, edit_each, list_methods, load
from kedit.edits import Edit, WeightDelta
from kedit.eval.runner import evaluate
from kedit.lm import LM
from kedit.requests import EditRequest, Probe
from kedit.session import Session

__all__ = [
    "LM",
    "Edit",
    "EditRequest",
    "Probe",
    "Session",
    "WeightDelta",
    "apply",
    "edit",
    "edit_each",
    "evaluate",
    "list_methods",
    "load",
]
