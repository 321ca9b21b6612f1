"""kedit: locate, edit, erase and explain knowledge inside transformer language models."""

from kedit._version import __version__ as __version__
from kedit.api import apply, edit, edit_each, list_methods, load, train_editor, unlearn
from kedit.data.unlearn_items import UnlearnItem
from kedit.edits import Edit, ModelMismatchError, UndoOrderError, WeightDelta
from kedit.eval.runner import evaluate
from kedit.layout import UnsupportedArchitectureError
from kedit.lm import LM
from kedit.requests import EditRequest, Probe
from kedit.session import Session
from kedit.stats import CorpusUnavailable
from kedit.unlearn.evaluate import evaluate_unlearning

__all__ = [
    "LM",
    "CorpusUnavailable",
    "Edit",
    "EditRequest",
    "ModelMismatchError",
    "Probe",
    "Session",
    "UndoOrderError",
    "UnlearnItem",
    "UnsupportedArchitectureError",
    "WeightDelta",
    "apply",
    "edit",
    "edit_each",
    "evaluate",
    "evaluate_unlearning",
    "list_methods",
    "load",
    "train_editor",
    "unlearn",
]
