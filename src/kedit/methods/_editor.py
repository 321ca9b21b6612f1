"""What the trained editors that read an edit's gradient share (MEND, MALMEN): the gradient's
rank-one factors at the edited layers, the hypernetwork that transforms them, the editor file,
and running a model with low-rank weight changes without writing them.

The gradient of a request's target NLL with respect to the weight of a linear layer is a sum of
rank-one terms, one per token: ∇W = Σ_t δ_t u_tᵀ, with u_t the layer's input and δ_t the
gradient of the loss with respect to its output at token t (MEND, Mitchell et al. 2022, §3.1).
`gradient_factors` computes (u_t, δ_t) at the MLP output projections of the edited layers in one
forward and one backward pass of the model, whose weights take no gradient.

`FactorNet` is MEND's hypernetwork g: the factors, normalised per layer to zero mean and unit
variance, are concatenated, z = [û; δ̂], and mapped to z + W₂(s_ℓ ⊙ relu(W₁z + b₁) + o_ℓ) + b₂,
one network shared by the edited layers, with a layer-specific scale s_ℓ and offset o_ℓ (the
paper's layer embedding) and a learned step size α_ℓ per layer. W₂ starts at zero, so g starts
as the identity on the normalised factors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kedit.hooks import capture, replace_output
from kedit.lm import LM
from kedit.methods._rows import target_batch
from kedit.methods._train import output_gradients
from kedit.requests import EditRequest

EDITOR_FILE = "editor.safetensors"
EDITOR_FORMAT = "kedit-editor"
BUNDLED_EDITORS = Path(__file__).resolve().parents[1] / "zoo" / "editors"
EDITOR_METHODS = ("mend", "malmen")


def default_layers(lm: LM) -> list[int]:
    """The layers a gradient editor edits unless told: the last three (as in MEND's paper)."""
    return list(range(max(0, lm.n_layers - 3), lm.n_layers))


def mlp_out_shape(lm: LM, layer: int) -> tuple[int, int]:
    """(input width, output width) of a layer's MLP output projection."""
    weight = lm.model.get_submodule(lm.layout.mlp_out_name(layer)).weight
    return lm.layout.in_out(weight)


@dataclass
class Factors:
    """The gradient's rank-one factors of some requests: per edited layer, the inputs `keys`
    `[n, d_in]` and output gradients `grads` `[n, d_out]` at each of the requests' tokens, and
    which request each token belongs to (`owner`, `[n]`)."""

    keys: list[torch.Tensor]
    grads: list[torch.Tensor]
    owner: torch.Tensor


def gradient_factors(lm: LM, requests: list[EditRequest], layers: list[int]) -> Factors:
    """The factors of each request's mean target NLL (teacher-forced, all its targets) at the
    layers' MLP output projections: one forward and one backward pass."""
    paths = [lm.layout.mlp_out_name(layer) for layer in layers]
    batch = target_batch(lm, requests)

    def loss(nll: torch.Tensor) -> torch.Tensor:
        # Each row's loss is its own request's (rows do not see each other); a request with k
        # targets has k rows, weighted 1/k.
        return (nll * batch.weights * len(requests)).sum()

    inputs, grads = output_gradients(lm, batch, paths, loss)
    rows = _row_owner(requests)
    valid = batch.mask.bool()
    owner = rows.to(valid.device)[:, None].expand_as(valid)[valid]
    return Factors(
        [inputs[path][valid].float() for path in paths],
        [grad[valid].float() for grad in grads],
        owner.cpu(),
    )


def _row_owner(requests: list[EditRequest]) -> torch.Tensor:
    """The request of each row of `target_batch` (one row per target)."""
    return torch.tensor([i for i, r in enumerate(requests) for _ in r.targets], dtype=torch.long)


class FactorNet(nn.Module):
    """MEND's hypernetwork (see the module's docstring) for layers whose factors are `d_in` and
    `d_out` wide; `n_layers` edited layers share it."""

    def __init__(self, d_in: int, d_out: int, n_layers: int, hidden: int, init_lr: float) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        width = d_in + d_out
        self.first = nn.Linear(width, hidden)
        self.second = nn.Linear(hidden, width)
        nn.init.zeros_(self.second.weight)
        nn.init.zeros_(self.second.bias)
        self.scale = nn.Parameter(torch.ones(n_layers, hidden))
        self.offset = nn.Parameter(torch.zeros(n_layers, hidden))
        self.log_lr = nn.Parameter(torch.full((n_layers,), math.log(init_lr)))
        self.log_ridge = nn.Parameter(torch.zeros(n_layers))  # MALMEN's λ_ℓ, as log λ_ℓ
        self.register_buffer("mean", torch.zeros(n_layers, width))
        self.register_buffer("std", torch.ones(n_layers, width))

    @torch.no_grad()
    def fit_normalisation(self, factors: Factors) -> None:
        """Set each layer's mean and standard deviation of [u; δ] from sampled factors."""
        for index, (keys, grads) in enumerate(zip(factors.keys, factors.grads, strict=True)):
            z = torch.cat([keys, grads], dim=-1)
            self.mean[index] = z.mean(0)
            self.std[index] = z.std(0).clamp_min(1e-8)

    def forward(
        self, index: int, keys: torch.Tensor, grads: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformed factors (ũ, δ̃) of edited layer number `index`."""
        z = (torch.cat([keys, grads], dim=-1) - self.mean[index]) / self.std[index]
        hidden = torch.relu(self.first(z)) * self.scale[index] + self.offset[index]
        z = z + self.second(hidden)
        return z[:, : self.d_in], z[:, self.d_in :]

    def in_gradient_units(self, index: int, grads_t: torch.Tensor) -> torch.Tensor:
        """Transformed output gradients δ̃ taken back from the normalised space (δ̃ σ + μ)."""
        return grads_t * self.std[index, self.d_in :] + self.mean[index, self.d_in :]

    @torch.no_grad()
    def start_step_at_gradient_scale(self) -> None:
        """α_ℓ = 1 / (mean standard deviation of δ at layer ℓ): a step −α δ of about one unit
        per output dimension."""
        self.log_lr.copy_(-self.std[:, self.d_in :].mean(-1).log())

    def lr(self, index: int) -> torch.Tensor:
        return self.log_lr[index].exp()

    def ridge(self, index: int) -> torch.Tensor:
        return self.log_ridge[index].exp()


@dataclass
class EditorMeta:
    """What an editor was trained for and on: stored beside its weights, checked on use."""

    method: str
    model: str
    model_fingerprint: str
    layers: list[int]
    d_in: int
    d_out: int
    hidden: int
    data_digest: str
    steps: int
    train: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the training, over all its runs


def check_trained_for(lm: LM, path: Path | None, model: str, fingerprint: str, method: str) -> None:
    """Refuse a trained editor (at `path`, of `method`) on another model than the one it was
    trained for (`model`, with its weights' `fingerprint`)."""
    if fingerprint != lm.fingerprint:
        raise ValueError(
            f"editor: {path or 'the editor'} was trained for {model!r} (fingerprint "
            f"{fingerprint}), not for {lm.name!r} (fingerprint {lm.fingerprint}); train one for "
            f"it with `kedit train {method} --model ...`"
        )


@dataclass
class Editor:
    """A trained gradient editor: its hypernetwork, what it was trained for, and where it lives
    (`path`, the folder of its `editor.safetensors`)."""

    net: FactorNet
    meta: EditorMeta
    path: Path | None = None

    def check_model(self, lm: LM) -> None:
        check_trained_for(
            lm, self.path, self.meta.model, self.meta.model_fingerprint, self.meta.method
        )

    def save(self, folder: str | Path) -> Path:
        """Write `editor.safetensors` (weights, with the metadata as JSON) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / EDITOR_FILE
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        meta = {"format": EDITOR_FORMAT, **asdict(self.meta)}
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(temporary), metadata={"kedit": json.dumps(meta)})
        os.replace(temporary, path)
        self.path = folder
        return folder


def new_net(meta: EditorMeta, init_lr: float) -> FactorNet:
    return FactorNet(meta.d_in, meta.d_out, len(meta.layers), meta.hidden, init_lr)


_LOADED: dict[tuple[str, int, int], Editor] = {}


def load_editor(path: str | Path, method: str) -> Editor:
    """The editor saved in folder `path` (or its `editor.safetensors`), for `method`."""
    folder = Path(path).expanduser()
    file = folder if folder.suffix == ".safetensors" else folder / EDITOR_FILE
    if not file.is_file():
        raise ValueError(
            f"editor: {str(path)!r} holds no {EDITOR_FILE}; train one with `kedit train {method} "
            "--model ... --out FOLDER`"
        )
    stat = file.stat()
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        with safe_open(str(file), "pt") as handle:
            stored = json.loads((handle.metadata() or {}).get("kedit", "{}"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if stored.pop("format", None) != EDITOR_FORMAT:
            raise ValueError(f"editor: {str(file)!r} is not a kedit editor file")
        meta = EditorMeta(**stored)
        net = new_net(meta, 1.0)
        net.load_state_dict(tensors)
        _LOADED[key] = Editor(net, meta, file.parent)
    editor = _LOADED[key]
    if editor.meta.method != method:
        raise ValueError(
            f"editor: {str(path)!r} is a {editor.meta.method} editor, not a {method} editor"
        )
    return editor


def cache_dir() -> Path:
    """Where `kedit train` puts editors unless told: $KEDIT_CACHE/editors."""
    return Path(os.environ.get("KEDIT_CACHE") or Path.home() / ".cache" / "kedit") / "editors"


def default_folder(method: str, lm: LM) -> Path:
    """The cache folder of `method`'s editor for `lm`."""
    return cache_dir() / f"{method}-{lm.fingerprint[:16]}"


def find_editor(method: str, lm: LM, path: str | None) -> Editor:
    """The editor at `path`; without one, the editor trained for `lm` in the cache (where
    `kedit train` puts it unless told), else the one bundled for a bundled model."""
    if path is not None:
        editor = load_editor(path, method)
    else:
        places = [default_folder(method, lm), BUNDLED_EDITORS / f"{method}-{lm.name}"]
        found = next((p for p in places if (p / EDITOR_FILE).is_file()), None)
        if found is None:
            raise ValueError(
                f"editor: {method} edits with a trained editor and none is given or trained for "
                f"{lm.name!r}; train one (`kedit train {method} --model {lm.name}`, or "
                f"kedit.train_editor) and pass editor=FOLDER"
            )
        editor = load_editor(found, method)
    editor.check_model(lm)
    return editor


def data_digest(requests: list[EditRequest]) -> str:
    """sha256 of the requests, as `EditRequest.to_dict` writes them."""
    text = json.dumps([r.to_dict() for r in requests], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class LowRank:
    """Weight changes of the edited layers, one per group of rows: per layer, `left`
    `[groups, d_out, r]` and `right` `[groups, r, d_in]`, so that group g's change of the
    layer's weight (as a map from inputs to outputs) is left[g] @ right[g]."""

    left: list[torch.Tensor]
    right: list[torch.Tensor]


@contextmanager
def changed(lm: LM, layers: list[int], change: LowRank, group: torch.Tensor) -> Iterator[None]:
    """Run `lm` as if each row's MLP output projections had its group's weight change (row i in
    group `group[i]`), without writing the weights; gradients reach the change."""
    model, paths = lm.model, [lm.layout.mlp_out_name(layer) for layer in layers]
    with ExitStack() as stack:
        inputs = stack.enter_context(capture(model, paths, "input", detach=False))
        for index, path in enumerate(paths):
            left, right = change.left[index], change.right[index]
            if len(left) == 1:  # one change for every row (MALMEN): as one dense matrix

                def add(output, path=path, dense=(left[0] @ right[0]).T):
                    return output + (inputs[path].float() @ dense).to(output.dtype)

            else:
                left, right = left[group], right[group]

                def add(output, path=path, left=left, right=right):
                    coefficients = torch.einsum("btd,brd->btr", inputs[path].float(), right)
                    shift = torch.einsum("btr,bor->bto", coefficients, left)
                    return output + shift.to(output.dtype)

            stack.enter_context(replace_output(model, path, add))
        yield


def pad_groups(parts: list[torch.Tensor], rank_dim: int) -> torch.Tensor:
    """Stack tensors whose size along `rank_dim` differs, zero-padded to the largest."""
    rank = max(p.shape[rank_dim] for p in parts)
    padded = []
    for part in parts:
        shape = list(part.shape)
        shape[rank_dim] = rank - part.shape[rank_dim]
        padded.append(torch.cat([part, part.new_zeros(shape)], dim=rank_dim))
    return torch.stack(padded)


@dataclass
class Scored:
    """Rows of prompt + answer tokens (the answer's last token left out, teacher forcing) and
    where each answer token is scored: `rows`, `cols` (the positions whose logits predict it),
    `targets` (its id) and `pair` (which (prompt, answer) pair it belongs to)."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    pair: torch.Tensor


def scored_rows(lm: LM, pairs: list[tuple[str, str]], contexts: list[str] | None = None) -> Scored:
    """The rows of (prompt, answer) pairs, one row per pair; with `contexts`, each pair's
    context text comes first (its tokens, then the prompt's as they follow a sequence start)."""
    sequences, rows, cols, targets, pair = [], [], [], [], []
    for index, (prompt, answer) in enumerate(pairs):
        prompt_ids, answer_ids = lm.encode_prompt(prompt), lm.encode(answer)
        if contexts is not None:
            prompt_ids = lm.encode_prompt(contexts[index]) + lm.encode(prompt)
        sequences.append(prompt_ids + answer_ids[:-1])
        for offset, token in enumerate(answer_ids):
            rows.append(index)
            cols.append(len(prompt_ids) - 1 + offset)
            targets.append(token)
            pair.append(index)
    ids, mask = lm.pad(sequences)
    as_long = [torch.tensor(x, dtype=torch.long, device=lm.device) for x in (rows, cols, targets)]
    return Scored(ids, mask, *as_long, torch.tensor(pair, dtype=torch.long))


def hits(logits: torch.Tensor, scored: Scored, n_pairs: int) -> torch.Tensor:
    """Whether every answer token of each pair is the argmax at its position (`[n_pairs]`)."""
    right = (logits[scored.rows, scored.cols].argmax(-1) == scored.targets).float().cpu()
    wrong = torch.zeros(n_pairs).index_add_(0, scored.pair, 1 - right)
    return wrong == 0


class TrainingProgress:
    """A progress bar over training steps (or nothing), advanced with each step's losses."""

    def __init__(self, show: bool, total: int, done: int) -> None:
        self.show, self.total, self.done = show, total, done
        self.bar: Progress | None = None

    def __enter__(self) -> Callable[[dict[str, float]], None]:
        if self.show:
            self.bar = Progress(
                TextColumn("training"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[losses]}"),
            )
            self.bar.start()
            self.task = self.bar.add_task("", total=self.total, completed=self.done, losses="")

        def advance(parts: dict[str, float]) -> None:
            if self.bar is not None:
                text = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                self.bar.update(self.task, advance=1, losses=text)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
