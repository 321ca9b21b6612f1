"""What the analyses share: facts as token ids with the subject's span, the facts a model
knows, and the plain result objects (`to_json()`, `plot()`, `save()`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.data.facts import Fact
from kedit.lm import LM
from kedit.requests import EditRequest


@dataclass(frozen=True)
class TokenizedFact:
    """A fact's prompt as token ids, the subject's token span [start, end) and the answer's
    first token (the model's own top prediction where the fact has no answer)."""

    fact: Fact
    ids: list[int]
    subject: tuple[int, int]
    answer_id: int

    def tokens(self, lm: LM) -> list[str]:
        return [lm.tokenizer.decode([i]) for i in self.ids]


def as_fact(item: Fact | EditRequest | dict) -> Fact:
    """A `Fact` from a Fact, an EditRequest (its true answer, else its new one) or a dict."""
    if isinstance(item, Fact):
        return item
    if isinstance(item, EditRequest):
        return Fact(item.template, item.subject, item.target_true or item.target_new)
    if isinstance(item, dict):
        unknown = set(item) - {"prompt", "subject", "answer", "relation"}
        if unknown:
            raise ValueError(
                f"fact: unknown field(s) {sorted(unknown)}; expected prompt, subject, answer"
            )
        return Fact(**item)
    raise TypeError(f"fact: expected a Fact, EditRequest or dict, got {type(item).__name__}")


def as_facts(items: Fact | EditRequest | dict | Iterable[Any]) -> list[Fact]:
    """A non-empty list of `Fact`s (see `as_fact`)."""
    if isinstance(items, Fact | EditRequest | dict):
        items = [items]
    facts = [as_fact(item) for item in items]
    if not facts:
        raise ValueError("facts: expected at least one fact, got none")
    return facts


def subject_span(lm: LM, fact: Fact) -> tuple[list[int], tuple[int, int]]:
    """The prompt's token ids (with the tokenizer's start tokens) and the subject's span."""
    text, template = fact.text, fact.template
    start_char = template.index("{}")
    end_char = start_char + len(fact.subject)
    ids = lm.encode_prompt(text)
    start = len(lm.encode_prompt(text[:start_char])) if start_char else len(lm.start_ids)
    end = len(lm.encode_prompt(text[:end_char]))
    if not start < end <= len(ids):
        raise ValueError(
            f"subject: {fact.subject!r} has no tokens of its own in {text!r}; the tokenizer "
            "merges it with its neighbours"
        )
    return ids, (start, end)


@torch.no_grad()
def tokenize_facts(lm: LM, facts: Sequence[Fact]) -> list[TokenizedFact]:
    """Each fact tokenized, with its answer's first token (or the model's top prediction)."""
    out, unanswered = [], []
    for fact in facts:
        ids, span = subject_span(lm, fact)
        answer_ids = lm.encode(fact.answer) if fact.answer is not None else None
        if answer_ids == []:
            raise ValueError(f"answer: {fact.answer!r} has no tokens")
        out.append(TokenizedFact(fact, ids, span, answer_ids[0] if answer_ids else -1))
        if answer_ids is None:
            unanswered.append(len(out) - 1)
    if unanswered:
        predicted = last_token_logits(lm, [out[i].ids for i in unanswered]).argmax(-1)
        for index, token in zip(unanswered, predicted.tolist(), strict=True):
            item = out[index]
            out[index] = TokenizedFact(item.fact, item.ids, item.subject, token)
    return out


def last_token_logits(lm: LM, sequences: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    """Logits (float32, on the CPU) at the last token of each sequence, in batches."""
    rows = []
    for begin in range(0, len(sequences), batch_size):
        chunk = sequences[begin : begin + batch_size]
        ids, mask = lm.pad(chunk)
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        last = torch.tensor([len(s) - 1 for s in chunk], device=logits.device)
        rows.append(logits[torch.arange(len(chunk), device=logits.device), last].float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def known_facts(lm: LM, facts: Sequence[Fact], n: int | None = None) -> list[Fact]:
    """The facts whose answer's first token is the model's top prediction (the first `n`)."""
    tokenized = tokenize_facts(lm, facts)
    predicted = last_token_logits(lm, [item.ids for item in tokenized]).argmax(-1).tolist()
    known = [
        item.fact
        for item, top in zip(tokenized, predicted, strict=True)
        if item.fact.answer is None or top == item.answer_id
    ]
    return known[:n] if n is not None else known


def tinyworld_facts(relation: str | None = "lives_in", template: int | str = 0) -> list[Fact]:
    """One fact per subject of a tinyworld relation, asked with the relation's `template`-th
    template (for "lives_in", template 0 is "{} lives in"), in world order. A template given
    as text finds its relation (`relation` None)."""
    from kedit.zoo import build_world

    world = build_world()
    if isinstance(template, str):
        found = [name for name, r in world.relations.items() if template in r.templates]
        if not found:
            raise ValueError(f"template: {template!r} is not a tinyworld template")
        relation, template = found[0], world.relations[found[0]].templates.index(template)
    if relation not in world.relations:
        raise ValueError(f"relation: expected one of {sorted(world.relations)}, got {relation!r}")
    templates = world.relations[relation].templates
    if not 0 <= template < len(templates):
        raise ValueError(f"template: expected 0..{len(templates) - 1}, got {template!r}")
    return [
        Fact(templates[template], subject, world.answer(subject, relation), relation)
        for subject in world.subjects(relation)
    ]


class Result:
    """Base of the analyses' result objects: `to_json()` gives plain data, `plot()` a
    matplotlib figure, `save(folder)` writes both (`NAME.json`, `NAME.png`)."""

    name = "result"

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def plot(self, path: str | Path | None = None) -> Any:
        raise NotImplementedError

    def save(self, folder: str | Path) -> list[Path]:
        """Write `to_json()` and `plot()` into `folder`; returns the files written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / f"{self.name}.json"
        data.write_text(json.dumps(self.to_json(), indent=1))
        figure = folder / f"{self.name}.png"
        self.plot(figure)
        return [data, figure]


def new_figure(width: float, height: float) -> Any:
    """A matplotlib figure made without pyplot (no GUI backend, nothing global to close);
    matplotlib is imported only when something is plotted."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure: Any, path: str | Path | None) -> Any:
    """Save a figure where a path is given; return the figure."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    return figure


def rounded(values: torch.Tensor | Sequence[Any], digits: int = 5) -> Any:
    """A tensor or nested list as nested lists of floats rounded for JSON."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, list | tuple):
        return [rounded(v, digits) for v in values]
    return round(float(values), digits)
