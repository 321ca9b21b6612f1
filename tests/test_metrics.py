import math
import string

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kedit.eval.metrics import (
    exact_match,
    fluency_entropy,
    locality_agreement,
    mean_nll,
    more_likely,
    ngram_entropy,
    normalize_answer,
    prefix_exact_match,
    token_accuracy,
)

TEXT = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " \t\n")
WORDS = st.lists(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=6), max_size=30)


@st.composite
def logits_and_targets(draw):
    length = draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 8))
    values = draw(st.lists(st.floats(-10, 10), min_size=length * vocab, max_size=length * vocab))
    targets = draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length))
    return torch.tensor(values).reshape(length, vocab), torch.tensor(targets)


def test_token_accuracy_counts_argmax_hits():
    logits = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    assert token_accuracy(logits, [1, 0, 0, 0]) == 0.5


def test_token_accuracy_rejects_length_mismatch():
    with pytest.raises(ValueError, match="one length"):
        token_accuracy(torch.zeros(3, 4), [0, 1])


@given(logits_and_targets())
def test_token_accuracy_is_a_fraction(case):
    logits, targets = case
    accuracy = token_accuracy(logits, targets)
    assert 0.0 <= accuracy <= 1.0
    assert accuracy * len(targets) == pytest.approx(round(accuracy * len(targets)))


@given(logits_and_targets())
def test_token_accuracy_is_one_on_the_argmax(case):
    logits, _ = case
    assert token_accuracy(logits, logits.argmax(-1)) == 1.0


def test_locality_agreement_is_the_fraction_of_unchanged_tokens():
    # EasyEdit's example: [29, 234, 334] before, [29, 234, 333] after -> 2/3.
    assert locality_agreement([29, 234, 333], [29, 234, 334]) == pytest.approx(2 / 3)
    assert locality_agreement(torch.tensor([5]), torch.tensor([5])) == 1.0


@given(logits_and_targets())
def test_mean_nll_matches_cross_entropy(case):
    logits, targets = case
    nll = mean_nll(logits, targets)
    assert nll >= 0.0
    assert nll == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), abs=1e-5)


def test_mean_nll_of_uniform_logits_is_log_vocab():
    assert mean_nll(torch.zeros(3, 10), [1, 2, 3]) == pytest.approx(math.log(10))


def test_mean_nll_rejects_misaligned_targets():
    with pytest.raises(ValueError, match="answer tokens"):
        mean_nll(torch.zeros(2, 5), [1, 2, 3])


def test_more_likely_compares_nlls():
    assert more_likely(0.5, than=2.0)
    assert not more_likely(2.0, than=0.5)
    assert not more_likely(1.0, than=1.0)


@given(TEXT)
def test_normalize_is_idempotent(text):
    assert normalize_answer(normalize_answer(text)) == normalize_answer(text)


@given(TEXT)
def test_exact_match_ignores_case_spacing_and_trailing_punctuation(text):
    assert exact_match(text.upper(), text.lower())
    assert exact_match(" \n" + text.replace(" ", "  \t") + "  ", text)
    assert exact_match(text + " .!?", text)


def test_exact_match_keeps_what_matters():
    assert normalize_answer("  New   York City. ") == "new york city"
    assert not exact_match("Lisbon", "Lisbo")
    assert not exact_match("(Lisbon", "Lisbon")
    assert not exact_match("New York", "NewYork")


def test_prefix_exact_match_reads_the_answer_length_in_words():
    assert prefix_exact_match(" Lisbon is a city", " Lisbon")
    assert prefix_exact_match(" Lisbon.", "Lisbon")
    assert prefix_exact_match(" New York City", " New York")
    assert not prefix_exact_match(" Lisbonia", " Lisbon")
    assert not prefix_exact_match(" Oslo", " Lisbon")
    assert not prefix_exact_match("", " Lisbon")


@given(st.text(alphabet=string.ascii_letters, min_size=1, max_size=8), st.integers(0, 40))
def test_entropy_of_a_repeated_word_is_zero(word, count):
    text = " ".join([word] * count)
    assert ngram_entropy(text, 2) == 0.0
    assert fluency_entropy([text]) == 0.0


@given(WORDS, st.integers(1, 4))
def test_ngram_entropy_is_bounded_by_the_ngram_count(words, n):
    entropy = ngram_entropy(" ".join(words), n)
    grams = max(len(words) - n + 1, 1)
    assert 0.0 <= entropy <= math.log2(grams) + 1e-9


def test_fluency_weights_bigram_and_trigram_entropies():
    # 4 distinct words: 3 equiprobable bigrams, 2 equiprobable trigrams.
    expected = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert fluency_entropy(["a b c d"]) == pytest.approx(expected)
    assert fluency_entropy(["a b c d", "x x x"]) == pytest.approx(expected / 2)
    # Punctuation counts as a word token.
    assert ngram_entropy("a, a", 2) == pytest.approx(1.0)


def test_fluency_needs_texts():
    with pytest.raises(ValueError, match="texts"):
        fluency_entropy([])
    with pytest.raises(ValueError, match="texts"):
        fluency_entropy("a single string")
