"""Training the gradient editors (MEND, MALMEN) on a set of edit requests, with checkpoints.

Each step takes a batch of training requests, computes their gradient factors on the unedited
model, turns them into weight changes with the hypernetwork (MEND: one change per request;
MALMEN: one least-squares change for the whole batch), and runs the model with those changes
on the requests' prompts and paraphrases (the edit loss: the target's mean NLL) and on their
locality probes (the locality loss: the KL divergence of the edited model's next-token
distributions from the unedited model's at every position), MEND's eq. 4:

    L = c_edit · L_edit + c_loc · L_loc.

The model's weights never change; only the hypernetwork trains (Adam). Every
`checkpoint_every` steps the hypernetwork, the optimiser and the step are saved in the output
folder with what the training is for (model fingerprint, a digest of the data, the settings);
a later call with the same folder and the same model, data and settings resumes there, and one
with others is refused. The batches depend only on the seed and the step, so a resumed run
sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.data import load_requests
from kedit.lm import LM
from kedit.methods._editor import (
    EDITOR_FILE,
    Editor,
    EditorMeta,
    FactorNet,
    Factors,
    LowRank,
    Scored,
    TrainingProgress,
    changed,
    data_digest,
    default_folder,
    default_layers,
    gradient_factors,
    hits,
    load_editor,
    mlp_out_shape,
    new_net,
    scored_rows,
)
from kedit.methods._train import frozen
from kedit.methods.malmen import malmen_change
from kedit.methods.mend import mend_change
from kedit.methods.registry import hp
from kedit.methods.serac import train_serac
from kedit.requests import EditRequest
from kedit.zoo import DATA_DIR
from kedit.zoo.edit_split import TRAIN_EDITS_FILE

CHECKPOINT_FILE = "checkpoint.pt"
ChangeFn = Callable[[FactorNet, Factors, torch.Tensor, int], LowRank]
# method -> (how factors become changes, whether a batch's edits form one change)
CHANGES: dict[str, tuple[ChangeFn, bool]] = {
    "mend": (mend_change, False),
    "malmen": (malmen_change, True),
}
# α_ℓ at the start. MEND's change moves a key's output by α Σ δ̃ (ũ·u), where the normalised
# ũ meets the raw key; MALMEN's maps each key to d = −α δ itself: its α starts at the scale of
# the layer's gradients (None: `FactorNet.start_step_at_gradient_scale`).
INITIAL_STEP = {"mend": 1e-3, "malmen": None}
NORMALISATION_REQUESTS = 128  # requests whose factors set the hypernetwork's normalisation


@dataclass
class EditorTraining:
    """Settings of an editor's training (stored in the editor's metadata)."""

    steps: int = hp(300, "Training steps.")
    batch: int = hp(16, "Requests per step (MALMEN edits them together, in one solve).")
    lr: float = hp(1e-3, "Adam learning rate of the hypernetwork's weights.")
    scalar_lr: float = hp(2e-2, "Adam learning rate of the step sizes α_ℓ and ridges λ_ℓ (logs).")
    init_lr: float | None = hp(
        None, "α_ℓ at the start (None: MEND 1e-3; MALMEN one over the gradients' deviation)."
    )
    hidden: int = hp(128, "Hidden width of the hypernetwork.")
    layers: list[int] | None = hp(None, "Edited layers' MLP output projections (None: last 3).")
    edit_weight: float = hp(1.0, "c_edit: weight of the edit loss.")
    locality_weight: float = hp(5.0, "c_loc: weight of the locality KL.")
    seed: int = hp(0, "Seed of the batch order and the hypernetwork's initial weights.")
    checkpoint_every: int = hp(50, "Save a checkpoint every N steps (0: only at the end).")
    validate_every: int = hp(200, "Validate every N steps (0: only at the end).")

    def validate(self) -> None:
        for name in ("steps", "batch", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("lr", "scalar_lr", "init_lr"):
            if name == "init_lr" and self.init_lr is None:
                continue
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("edit_weight", "locality_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        for name in ("checkpoint_every", "validate_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EditorTraining:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"settings: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        settings = cls(**values)
        settings.validate()
        return settings


VALIDATION_SHARE = 0.1  # of the subjects, held out for validation where no val set is given


def tinyworld_edits() -> list[EditRequest]:
    """tinyworld's training edits (`kedit.zoo.edit_split`)."""
    return list(load_requests(DATA_DIR / TRAIN_EDITS_FILE))


def split_by_subject(
    requests: list[EditRequest], share: float = VALIDATION_SHARE
) -> tuple[list[EditRequest], list[EditRequest]]:
    """(train, val): the requests of the last `share` of the subjects (at least one; in order
    of first appearance) for validation, the others for training."""
    subjects = list(dict.fromkeys(r.subject for r in requests))
    if len(subjects) < 2:
        raise ValueError(
            f"train: {len(subjects)} subject(s); holding out validation subjects needs two or "
            "more (or give val)"
        )
    held = set(subjects[len(subjects) - max(1, round(share * len(subjects))) :])
    return [r for r in requests if r.subject not in held], [
        r for r in requests if r.subject in held
    ]


def _check_requests(name: str, requests: Any) -> list[EditRequest]:
    items = list(requests) if requests is not None else []
    if not items:
        raise ValueError(f"{name}: expected at least one EditRequest, got none")
    for index, item in enumerate(items):
        if not isinstance(item, EditRequest):
            raise ValueError(f"{name}[{index}]: expected an EditRequest, got {type(item).__name__}")
    return items


def _layers(lm: LM, settings: EditorTraining) -> tuple[list[int], tuple[int, int]]:
    """The edited layers, checked, and the shape their shared hypernetwork reads."""
    layers = settings.layers or default_layers(lm)
    layers = sorted({lm.check_layer(layer) for layer in layers})
    shapes = {mlp_out_shape(lm, layer) for layer in layers}
    if len(shapes) > 1:
        raise ValueError(
            f"layers: {layers} have MLP output projections of different shapes {sorted(shapes)}; "
            "a hypernetwork is shared by layers of one shape"
        )
    return layers, shapes.pop()


@dataclass
class _Rows:
    """The rows one step (or validation) runs with the edits: each request's prompt and
    paraphrases with its target (`edit`), and its locality probes with their answers
    (`locality`), each row's request, and which of the edit rows are the prompt's."""

    edit: Scored
    edit_owner: torch.Tensor
    is_prompt: torch.Tensor
    locality: Scored | None
    locality_owner: torch.Tensor


def _rows(lm: LM, requests: list[EditRequest]) -> _Rows:
    edit_pairs, edit_owner, is_prompt, loc_pairs, loc_owner = [], [], [], [], []
    for index, request in enumerate(requests):
        for position, prompt in enumerate((request.text, *request.rephrase)):
            edit_pairs.append((prompt, request.target_new))
            edit_owner.append(index)
            is_prompt.append(position == 0)
        for probe in request.locality:
            loc_pairs.append((probe.prompt, probe.answer))
            loc_owner.append(index)
    locality = scored_rows(lm, loc_pairs) if loc_pairs else None
    return _Rows(
        scored_rows(lm, edit_pairs),
        torch.tensor(edit_owner),
        torch.tensor(is_prompt),
        locality,
        torch.tensor(loc_owner, dtype=torch.long),
    )


def _edited_logits(
    lm: LM, layers: list[int], change: LowRank, rows: _Rows, joint: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The edited model's logits on the edit rows and the locality rows (one forward pass)."""
    parts = [rows.edit] + ([rows.locality] if rows.locality is not None else [])
    owners = [rows.edit_owner] + ([rows.locality_owner] if rows.locality is not None else [])
    width = max(p.ids.shape[1] for p in parts)
    ids = torch.cat([_widen(p.ids, width, lm.tokenizer.pad_token_id) for p in parts])
    mask = torch.cat([_widen(p.mask, width, 0) for p in parts])
    group = torch.cat(owners)
    group = torch.zeros_like(group) if joint else group
    with changed(lm, layers, change, group.to(lm.device)):
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    edit_logits = logits[: len(rows.edit.ids), : rows.edit.ids.shape[1]]
    if rows.locality is None:
        return edit_logits, None
    return edit_logits, logits[len(rows.edit.ids) :, : rows.locality.ids.shape[1]]


def _widen(tensor: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    extra = tensor.new_full((tensor.shape[0], width - tensor.shape[1]), fill)
    return torch.cat([tensor, extra], dim=1)


def _edit_nll(logits: torch.Tensor, scored: Scored, n_pairs: int) -> torch.Tensor:
    """The mean over pairs of each pair's mean answer-token NLL."""
    logp = torch.log_softmax(logits[scored.rows, scored.cols], dim=-1)
    token_nll = -logp.gather(1, scored.targets[:, None]).squeeze(1)
    pair = scored.pair.to(logits.device)
    totals = torch.zeros(n_pairs, device=logits.device).index_add(0, pair, token_nll)
    counts = torch.zeros(n_pairs, device=logits.device).index_add(
        0, pair, torch.ones_like(token_nll)
    )
    return (totals / counts).mean()


def _locality_kl(edited: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ edited) of the next-token distributions, averaged over the valid positions."""
    base_logp = torch.log_softmax(base, dim=-1)
    kl = (base_logp.exp() * (base_logp - torch.log_softmax(edited, dim=-1))).sum(-1)
    valid = mask.bool().to(kl.device)
    return kl[valid].mean()


def _base_logits(lm: LM, scored: Scored) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=scored.ids, attention_mask=scored.mask, use_cache=False).logits


def _change(
    lm: LM, net: FactorNet, method: str, requests: list[EditRequest], layers: list[int]
) -> tuple[LowRank, bool]:
    """The requests' changes (one per request, or one for all where the method edits a batch
    as one) and whether it is one for all."""
    change_fn, joint = CHANGES[method]
    factors = gradient_factors(lm, requests, layers)
    n_groups = 1 if joint else len(requests)
    groups = torch.zeros_like(factors.owner) if joint else factors.owner
    return change_fn(net, factors, groups, n_groups), joint


def _step_loss(
    lm: LM,
    net: FactorNet,
    method: str,
    requests: list[EditRequest],
    layers: list[int],
    settings: EditorTraining,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MEND's eq. 4 on a batch of training requests, and its parts."""
    change, joint = _change(lm, net, method, requests, layers)
    rows = _rows(lm, requests)
    edit_logits, loc_logits = _edited_logits(lm, layers, change, rows, joint)
    edit = _edit_nll(edit_logits, rows.edit, len(rows.edit.ids))
    loss = settings.edit_weight * edit
    parts = {"edit_nll": float(edit.detach())}
    if loc_logits is not None:
        kl = _locality_kl(loc_logits, _base_logits(lm, rows.locality), rows.locality.mask)
        loss = loss + settings.locality_weight * kl
        parts["locality_kl"] = float(kl.detach())
    return loss, parts


@torch.no_grad()
def validate(
    lm: LM, net: FactorNet, method: str, requests: list[EditRequest], layers: list[int], batch: int
) -> dict[str, float]:
    """Reliability (the prompt's target is the teacher-forced argmax), generalization (the
    paraphrases'), locality (the locality answers' argmax unchanged) of edits made `batch` at a
    time (MEND: each on its own; MALMEN: each batch together, `consistent_batches`)."""
    counts = {"reliability": [], "generalization": [], "locality": []}
    for chunk in consistent_batches(requests, batch):
        change, joint = _change(lm, net, method, chunk, layers)
        rows = _rows(lm, chunk)
        edit_logits, loc_logits = _edited_logits(lm, layers, change, rows, joint)
        right = hits(edit_logits, rows.edit, len(rows.edit.ids))
        counts["reliability"] += right[rows.is_prompt].tolist()
        counts["generalization"] += right[~rows.is_prompt].tolist()
        if loc_logits is not None:
            scored = rows.locality
            base = _base_logits(lm, scored)[scored.rows, scored.cols].argmax(-1)
            same = (loc_logits[scored.rows, scored.cols].argmax(-1) == base).float().cpu()
            counts["locality"] += same.tolist()
    return {k: sum(v) / len(v) for k, v in counts.items() if v}


def consistent_batches(requests: list[EditRequest], size: int) -> list[list[EditRequest]]:
    """The requests in batches of at most `size` where no two edit the same fact (the same
    subject and paraphrases) towards different targets, which no batch edit can satisfy:
    each request goes to the first batch that has room and no such conflict, in order."""
    batches: list[list[EditRequest]] = []
    facts: list[set] = []
    for request in requests:
        fact = (request.subject, request.rephrase or request.text)
        index = next(
            (i for i, b in enumerate(batches) if len(b) < size and fact not in facts[i]), None
        )
        if index is None:
            batches.append([])
            facts.append(set())
            index = len(batches) - 1
        batches[index].append(request)
        facts[index].add(fact)
    return batches


def _validated(
    lm: LM,
    net: FactorNet,
    method: str,
    val: list[EditRequest],
    layers: list[int],
    batch: int,
    step: int,
) -> dict[str, float]:
    return {"step": step, **validate(lm, net, method, val, layers, batch)}


def _batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The requests of step `step`: consecutive slices of one seeded permutation per epoch."""
    per_epoch = max(1, n // batch)
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[slot * batch : slot * batch + min(batch, n)].tolist()


def _identity(meta: EditorMeta) -> dict[str, Any]:
    """What a checkpoint must match to be resumed."""
    fields = ("method", "model_fingerprint", "layers", "hidden", "data_digest", "train")
    return {name: getattr(meta, name) for name in fields}


def _save_checkpoint(
    path: Path, net, optimizer, step: int, meta: EditorMeta, history, seconds: float
) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    state = {
        "net": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "identity": _identity(meta),
        "history": history,
        "seconds": seconds,
    }
    torch.save(state, temporary)
    os.replace(temporary, path)


def train_editor(
    lm: LM,
    method: str,
    train: list[EditRequest],
    val: list[EditRequest] | None = None,
    out: str | Path | None = None,
    settings: EditorTraining | dict[str, Any] | None = None,
    progress: bool = True,
) -> Editor:
    """Train `method`'s hypernetwork for `lm` on `train`, validated on `val`; saved in `out`
    (default: the editor cache, where `kedit.edit` finds it), resumed from its checkpoint."""
    if method not in CHANGES:
        raise ValueError(f"method: expected one of {', '.join(CHANGES)}, got {method!r}")
    train = _check_requests("train", train)
    val = _check_requests("val", val) if val is not None else []
    if not isinstance(settings, EditorTraining):
        settings = EditorTraining.from_dict(settings or {})
    settings.validate()
    layers, (d_in, d_out) = _layers(lm, settings)
    folder = Path(out) if out is not None else default_folder(method, lm)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out: {str(folder)!r} is a file; give a folder")
    meta = EditorMeta(
        method=method,
        model=lm.name,
        model_fingerprint=lm.fingerprint,
        layers=layers,
        d_in=d_in,
        d_out=d_out,
        hidden=settings.hidden,
        data_digest=data_digest(train + val),
        steps=settings.steps,
        train=asdict(settings),
    )
    done = folder / EDITOR_FILE
    if done.is_file():
        editor = load_editor(folder, method)
        if _identity(editor.meta) == _identity(meta):
            return editor
        raise ValueError(
            f"out: {str(folder)!r} holds an editor trained for another model, data or settings; "
            "give another folder or remove it"
        )
    torch.manual_seed(settings.seed)
    initial_step = settings.init_lr or INITIAL_STEP[method]
    net = new_net(meta, initial_step or 1.0).to(lm.device)
    scalars = [net.log_lr, net.log_ridge]
    weights = [p for p in net.parameters() if all(p is not s for s in scalars)]
    optimizer = torch.optim.Adam(
        [{"params": weights, "lr": settings.lr}, {"params": scalars, "lr": settings.scalar_lr}]
    )
    checkpoint = folder / CHECKPOINT_FILE
    step, history, before = 0, [], 0.0
    started = time.perf_counter()
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=lm.device, weights_only=False)
        if state["identity"] != _identity(meta):
            raise ValueError(
                f"out: {str(folder)!r} holds a checkpoint of a training for another model, data "
                "or settings; give another folder or remove it"
            )
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, before = state["step"], state["history"], state["seconds"]
    else:
        sample = train[:NORMALISATION_REQUESTS]
        net.fit_normalisation(gradient_factors(lm, sample, layers))
        if initial_step is None:
            net.start_step_at_gradient_scale()
    folder.mkdir(parents=True, exist_ok=True)
    with frozen(lm.model, []), TrainingProgress(progress, settings.steps, step) as advance:
        while step < settings.steps:
            chunk = [
                train[i] for i in _batch_indices(len(train), settings.batch, step, settings.seed)
            ]
            loss, parts = _step_loss(lm, net, method, chunk, layers, settings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            advance(parts)
            if val and settings.validate_every and step % settings.validate_every == 0:
                history.append(
                    {"step": step, **validate(lm, net, method, val, layers, settings.batch)}
                )
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                spent = before + time.perf_counter() - started
                _save_checkpoint(checkpoint, net, optimizer, step, meta, history, spent)
        if val and (not history or history[-1]["step"] != step):
            history.append(_validated(lm, net, method, val, layers, settings.batch, step))
    meta.validation = {"history": history}
    meta.seconds = round(before + time.perf_counter() - started, 1)
    editor = Editor(net.cpu(), meta)
    editor.save(folder)
    checkpoint.unlink(missing_ok=True)
    return load_editor(folder, method)


def train_any(
    lm: LM,
    method: str,
    train: list[EditRequest],
    val: list[EditRequest],
    out: str | Path | None,
    settings: dict[str, Any] | None,
    progress: bool,
) -> Any:
    """Train the editor of any method that has one (`kedit.train_editor`)."""
    trainers = {**{name: train_editor for name in CHANGES}, "serac": train_serac}
    if method not in trainers:
        raise ValueError(
            f"method: {method!r} needs no training; the trained editors are {', '.join(trainers)}"
        )
    return trainers[method](lm, method, train, val or None, out, settings, progress)
