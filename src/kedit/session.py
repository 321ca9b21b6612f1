"""Sequential editing: edits applied one after another to one model, undone as a whole."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kedit import api
from kedit.edits import Edit
from kedit.lm import LM, require_lm
from kedit.methods.registry import HyperParams, get_method, resolve_hparams
from kedit.requests import EditRequest


class Session:
    """A sequence of edits of `lm` with one method and one set of hyper-parameters.

    Each `edit()` is computed on the model as the earlier ones left it and is applied at once.
    Stateful methods keep what they remember of earlier edits (AlphaEdit: their keys) in
    `.state`, which belongs to this session alone. `undo()` reverts the whole session
    bit-exactly; `len(session)` is the number of edits made (each may hold a batch).
    """

    def __init__(
        self, lm: LM, method: str, hparams: dict[str, Any] | HyperParams | None = None
    ) -> None:
        require_lm(lm)
        spec = get_method(method)
        self.lm = lm
        self.method = spec.name
        self.hparams = resolve_hparams(spec.name, lm, hparams)
        self.state = None if spec.state is None else spec.state()
        self.edits: list[Edit] = []

    def edit(
        self, requests: EditRequest | Iterable[EditRequest], batch_size: int | None = None
    ) -> Edit:
        """Apply an edit on top of the current model (see `kedit.edit`) and return it."""
        edit = api.edit(self.lm, requests, self.method, self.hparams, batch_size, self.state)
        self.edits.append(edit)
        return edit

    def adopt(self, edit: Edit) -> Edit:
        """Count an edit already applied to this session's model (e.g. one re-applied from its
        file when a run resumes) as the session's next edit. A stateful method's memory is not
        rebuilt from it: restore that with `load_state`."""
        if edit.lm is not self.lm:
            raise ValueError(f"edit: applied to {edit.lm.name!r}, not to this session's model")
        if edit.method != self.method:
            raise ValueError(
                f"edit: made by method {edit.method!r}, this session edits with {self.method!r}"
            )
        if not edit.applied:
            raise ValueError("edit: not applied; apply it before adopting it")
        self.edits.append(edit)
        return edit

    def save_state(self, path: str | Path) -> None:
        """Write the method's memory of earlier edits and the number of edits made to `path`."""
        state = None if self.state is None else dict(vars(self.state))
        torch.save({"method": self.method, "edits": len(self.edits), "state": state}, path)

    def load_state(self, path: str | Path) -> int:
        """Restore the method's memory from a `save_state` file; returns how many edits the
        session had made when it was saved (adopt exactly those to resume it)."""
        saved = torch.load(path, weights_only=True, map_location=self.lm.device)
        if saved.get("method") != self.method:
            raise ValueError(
                f"{path}: state of method {saved.get('method')!r}, this session edits with "
                f"{self.method!r}"
            )
        if self.state is not None:
            vars(self.state).update(saved["state"])
        return int(saved["edits"])

    def undo(self) -> None:
        """Revert every edit of the session, the last first, bit-exactly; `.edits` is emptied
        and the method's state starts afresh, as the edits it remembered are gone."""
        for edit in reversed(self.edits):
            if edit.applied:
                edit.undo()
        self.edits.clear()
        self.reset_state()

    def reset_state(self) -> None:
        """Forget the method's memory of earlier edits; the edits themselves stay applied."""
        if self.state is not None:
            self.state.reset()

    def __len__(self) -> int:
        return len(self.edits)

    def __repr__(self) -> str:
        return f"Session({self.method}, {len(self.edits)} edit(s) on {self.lm.name!r})"
