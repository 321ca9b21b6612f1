"""Batched scoring of (prompt, answer) pairs under the three evaluation protocols.

- `teacher_forced` (EasyEdit): prompt + answer in one forward pass; token accuracy, and the
  argmax tokens at the answer positions (what EasyEdit's locality compares).
- `probability` (ROME/MEMIT CounterFact): mean NLL per answer token of each candidate.
- `generation`: greedy decoding, exact match of the continuation's first words.

Prompts and answers are tokenised separately and concatenated; rows are right-padded, so
each row's tokens keep the positions they would have alone. A prompt is read in the context of
the applied context edits (`kedit.edits.in_context`: in-context editing's demonstrations before
it); held-out perplexity (`text_nll`) scores the model's own text without them.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from kedit.edits import in_context
from kedit.eval.metrics import locality_agreement, mean_nll, prefix_exact_match, token_accuracy
from kedit.lm import LM

TEACHER_FORCED = "teacher_forced"
PROBABILITY = "probability"
GENERATION = "generation"
PROTOCOLS = (TEACHER_FORCED, PROBABILITY, GENERATION)
# Fluency is measured on sampled continuations; results file it under this name.
SAMPLING = "sampling"

Item = TypeVar("Item")
ProbeSet = TypeVar("ProbeSet", bound=Hashable)


def check_protocol(name: str) -> str:
    """Return `name` if it is a known protocol, else raise ValueError listing the known ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol: unknown protocol {name!r}; expected one of {list(PROTOCOLS)}")
    return name


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return batch_size


@dataclass(frozen=True)
class TokenScore:
    """Teacher-forced result for one pair: accuracy and the argmax token at each answer token."""

    accuracy: float
    predicted: tuple[int, ...]

    @classmethod
    def of(cls, logits: torch.Tensor, answer: Sequence[int]) -> TokenScore:
        """The score of logits `[T, vocab]` predicting the `T` answer tokens (gold prefix)."""
        return cls(token_accuracy(logits, answer), tuple(logits.argmax(-1).tolist()))


def teacher_forced_metrics(
    scores: Mapping[ProbeSet, Sequence[TokenScore]],
    pre: Mapping[ProbeSet, Sequence[TokenScore]] | None,
    locality: Collection[ProbeSet],
) -> dict[ProbeSet, list[float]]:
    """EasyEdit's teacher-forced metrics of one case at one stage: per probe set, one value
    per prompt. `kedit.evaluate` and `kedit.compat` both report these.

    A set named in `locality` is scored only after an edit (`pre`: the same probes scored on the
    unedited model): each prompt's fraction of answer positions whose argmax token is the
    unedited model's. Every other set (rewrite, rephrase, portability, ...) gets each prompt's
    token accuracy. Empty sets, and locality sets when `pre` is None, are left out.
    """
    out: dict[ProbeSet, list[float]] = {}
    for name, now in scores.items():
        if not now:
            continue
        if name not in locality:
            out[name] = [score.accuracy for score in now]
        elif pre is not None:
            out[name] = [
                locality_agreement(after.predicted, before.predicted)
                for after, before in zip(now, pre[name], strict=True)
            ]
    return out


@dataclass(frozen=True)
class GenerationScore:
    """Greedy continuation of a prompt and whether it starts with the expected answer."""

    text: str
    match: bool


def prompt_ids(lm: LM, prompt: str) -> list[int]:
    """Token ids of a prompt as the model reads it, in the context of applied context edits."""
    return lm.encode_prompt(in_context(lm.model, prompt))


def fitting_prompt_ids(lm: LM, prompt: str) -> list[int]:
    """`prompt_ids`, refusing a prompt that does not fit the model's positions (generation
    would index past them)."""
    ids = prompt_ids(lm, prompt)
    context = lm.context_length
    if context is not None and len(ids) > context:
        raise ValueError(
            f"prompt: {len(ids)} tokens (with applied context edits) do not fit the "
            f"model's {context} positions: {prompt[:60]!r}..."
        )
    return ids


def _packed(groups: Sequence[Sequence[Item]], batch_size: int) -> Iterator[list[Item]]:
    """Batches of at most `batch_size` items that never split a group (an oversized group is a
    batch of its own)."""
    batch: list[Item] = []
    for group in groups:
        if batch and len(batch) + len(group) > batch_size:
            yield batch
            batch = []
        batch.extend(group)
    if batch:
        yield batch


def _answer_logits(
    lm: LM, groups: Sequence[Sequence[tuple[str, str]]], batch_size: int
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """For every pair, in order: the logits predicting its answer tokens `[T, vocab]` and the
    `T` answer ids. One forward pass per batch."""
    check_batch_size(batch_size)
    for batch in _packed(groups, batch_size):
        encoded = [(prompt_ids(lm, prompt), lm.encode(answer)) for prompt, answer in batch]
        for pair, (prompt, answer) in zip(batch, encoded, strict=True):
            if not prompt or not answer:
                raise ValueError(f"{pair!r}: prompt and answer must each be at least one token")
        ids, mask = lm.pad([prompt + answer for prompt, answer in encoded])
        with torch.no_grad():
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for row, (prompt, answer) in enumerate(encoded):
            start = len(prompt) - 1
            yield logits[row, start : start + len(answer)].float(), answer


def score_teacher_forced(
    lm: LM, pairs: Sequence[tuple[str, str]], batch_size: int = 64
) -> list[TokenScore]:
    """Token accuracy and argmax answer tokens of each (prompt, answer) pair."""
    return [
        TokenScore.of(logits, answer)
        for logits, answer in _answer_logits(lm, [[pair] for pair in pairs], batch_size)
    ]


def score_probability(
    lm: LM, items: Sequence[tuple[str, Sequence[str]]], batch_size: int = 64
) -> list[tuple[float, ...]]:
    """Mean NLL per token of each candidate answer of each (prompt, answers) item.

    A prompt's candidates are scored in the same batch.
    """
    groups = [[(prompt, answer) for answer in answers] for prompt, answers in items]
    nlls = iter(
        [mean_nll(logits, answer) for logits, answer in _answer_logits(lm, groups, batch_size)]
    )
    return [tuple(next(nlls) for _ in group) for group in groups]


def greedy_generate(
    lm: LM, prompts: Sequence[str], max_new_tokens: Sequence[int], batch_size: int = 64
) -> list[list[int]]:
    """Greedy continuations (token ids, without the prompt), `max_new_tokens[i]` for prompt `i`
    at most, stopping at the end-of-sequence token and where the model's context ends.

    No KV cache: each step re-runs the right-padded rows that are still generating and reads
    the logits at each row's last real token; cheap for answer-length continuations.
    """
    check_batch_size(batch_size)
    eos = lm.tokenizer.eos_token_id
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [fitting_prompt_ids(lm, prompt) for prompt in prompts[start : start + batch_size]]
        wanted = max_new_tokens[start : start + batch_size]
        budgets = [lm.new_token_budget(len(row), n) for row, n in zip(rows, wanted, strict=True)]
        new: list[list[int]] = [[] for _ in rows]
        while active := [r for r in range(len(rows)) if len(new[r]) < budgets[r]]:
            ids, mask = lm.pad([rows[r] + new[r] for r in active])
            with torch.no_grad():
                logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            last = mask.sum(1) - 1
            tokens = logits[torch.arange(len(active), device=ids.device), last].argmax(-1)
            for r, token in zip(active, tokens.tolist(), strict=True):
                if token == eos:
                    budgets[r] = len(new[r])
                else:
                    new[r].append(token)
        results.extend(new)
    return results


def score_generation(
    lm: LM, pairs: Sequence[tuple[str, str]], batch_size: int = 64, margin: int = 2
) -> list[GenerationScore]:
    """Greedily decode as many tokens as each answer has, plus `margin`, and check that the
    continuation starts with the answer (normalised exact match of its first words)."""
    budgets = [len(lm.encode(answer)) + margin for _, answer in pairs]
    generated = greedy_generate(lm, [prompt for prompt, _ in pairs], budgets, batch_size)
    texts = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    return [
        GenerationScore(text, prefix_exact_match(text, answer))
        for text, (_, answer) in zip(texts, pairs, strict=True)
    ]


def sample_continuations(
    lm: LM, prompts: Sequence[str], max_new_tokens: int = 100, seed: int = 0, top_k: int = 5
) -> list[str]:
    """Top-k sampled continuations (text without the prompt), as ROME samples for fluency.

    Prompt `i` is sampled with seed `seed + i`, so results do not depend on the other prompts;
    the global random state is left as it was. Sampling stops at the model's context length.
    """
    continuations = []
    with torch.random.fork_rng():
        for index, prompt in enumerate(prompts):
            torch.manual_seed(seed + index)
            ids, mask = lm.pad([prompt_ids(lm, prompt)])
            budget = lm.new_token_budget(ids.shape[1], max_new_tokens)
            with torch.no_grad():
                out = lm.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    top_k=top_k,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=budget,
                    pad_token_id=lm.tokenizer.pad_token_id,
                )
            continuations.append(
                lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            )
    return continuations


@torch.no_grad()
def text_nll(lm: LM, texts: Sequence[str], batch_size: int = 32) -> list[tuple[float, int]]:
    """For each text (scored on its own), the summed NLL of its predicted tokens and their
    count: what perplexities over any subset of `texts` are made of."""
    check_batch_size(batch_size)
    if not texts:
        raise ValueError("texts: expected at least one text for perplexity, got none")
    scores: list[tuple[float, int]] = []
    for start in range(0, len(texts), batch_size):
        ids, mask = lm.pad([lm.encode_prompt(t) for t in texts[start : start + batch_size]])
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_logp = logp.gather(2, ids[:, 1:, None]).squeeze(-1)
        real = mask[:, 1:]
        nll = -(token_logp * real).sum(1)
        scores.extend(zip(nll.tolist(), real.sum(1).tolist(), strict=True))
    return scores


def pooled_perplexity(scores: Sequence[tuple[float, int]]) -> float:
    """exp of the mean NLL per predicted token over `text_nll` scores."""
    total = sum(nll for nll, _ in scores)
    count = sum(n for _, n in scores)
    return float(torch.exp(torch.tensor(total / max(count, 1))))


def perplexity(lm: LM, texts: Sequence[str], batch_size: int = 32) -> float:
    """exp of the mean NLL per predicted token over `texts` (each text scored on its own)."""
    return pooled_perplexity(text_nll(lm, texts, batch_size))
