"""Pure metric functions on logits, token ids and strings.

Logits passed here are the ones that predict the answer tokens: row `i` is the model's
output at the position just before answer token `i` (teacher forcing, gold prefix).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

WORD = re.compile(r"\w+|[^\w\s]")
ENTROPY_WEIGHTS = {2: 2 / 3, 3: 4 / 3}


def _match_fraction(a: torch.Tensor | Sequence[int], b: torch.Tensor | Sequence[int]) -> float:
    a = torch.as_tensor(a)
    b = torch.as_tensor(b, device=a.device)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"expected two non-empty token sequences of one length, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return (a == b).float().mean().item()


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> float:
    """EasyEdit's teacher-forced accuracy: the fraction of answer tokens that are the argmax.

    `logits` is `[T, vocab]`, `targets` the `T` answer token ids.
    """
    return _match_fraction(logits.argmax(-1), targets)


def locality_agreement(
    post: torch.Tensor | Sequence[int], pre: torch.Tensor | Sequence[int]
) -> float:
    """EasyEdit's locality: the fraction of positions where the post-edit argmax token equals
    the pre-edit one (both teacher-forced on the same prompt and answer)."""
    return _match_fraction(post, pre)


def mean_nll(logits: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> float:
    """Mean negative log-likelihood per answer token (natural log), as ROME compares targets."""
    targets = torch.as_tensor(targets, device=logits.device)
    if logits.dim() != 2 or logits.shape[0] != targets.numel() or targets.numel() == 0:
        raise ValueError(
            f"expected logits [T, vocab] for T answer tokens, got logits {tuple(logits.shape)} "
            f"and {targets.numel()} token(s)"
        )
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(1, targets.reshape(-1, 1)).mean().item()


def more_likely(nll: float, than: float) -> bool:
    """ROME's comparison ("new beats true"): lower mean-token NLL means more probable."""
    return nll < than


def normalize_answer(text: str) -> str:
    """Strip, lowercase, collapse whitespace and drop trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(string.punctuation + " ")


def exact_match(prediction: str, answer: str) -> bool:
    """Whether prediction and answer are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(answer)


def leading_words(text: str, n: int) -> str:
    """The first `n` whitespace-separated words of `text`."""
    return " ".join(text.split()[:n])


def prefix_exact_match(generated: str, answer: str) -> bool:
    """Whether a generated continuation starts with the answer: its first as many words as
    the answer has match the answer exactly (after normalisation)."""
    return exact_match(leading_words(generated, len(answer.split())), answer)


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the frequency distribution of the word n-grams of `text`."""
    words = WORD.findall(text)
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return sum(c / total * math.log2(total / c) for c in counts.values())


def fluency_entropy(texts: Sequence[str]) -> float:
    """ROME's generation entropy: per text, the mean of 2/3·H2 and 4/3·H3; averaged over texts."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts: expected a non-empty list of strings")
    per_text = [
        sum(weight * ngram_entropy(text, n) for n, weight in ENTROPY_WEIGHTS.items())
        / len(ENTROPY_WEIGHTS)
        for text in texts
    ]
    return sum(per_text) / len(per_text)


def multi_hop_accuracy(
    predictions: Sequence[Sequence[str]], answers: Sequence[Sequence[str]]
) -> float:
    """MQuAKE's multi-hop accuracy: the fraction of cases in which at least one of the case's
    questions is answered with one of its accepted answers.

    `predictions[i]` holds the model's continuations of case `i`'s questions, `answers[i]` the
    answers accepted for it (the new answer and its aliases); a continuation counts when it
    starts with an accepted answer (`prefix_exact_match`).
    """
    if isinstance(predictions, str) or isinstance(answers, str):
        raise ValueError("predictions, answers: expected one list of strings per case")
    if not predictions or len(predictions) != len(answers):
        raise ValueError(
            f"predictions, answers: expected one entry per case in each, at least one case; got "
            f"{len(predictions)} and {len(answers)}"
        )
    hits = [
        any(prefix_exact_match(text, answer) for text in texts for answer in accepted)
        for texts, accepted in zip(predictions, answers, strict=True)
    ]
    return sum(hits) / len(hits)
