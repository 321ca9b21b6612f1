"""Judges: the bundled n-gram judges, any Hugging Face sequence classifier, or a callable."""

from __future__ import annotations

import pytest
import torch

from kedit.eval.judges import LABELS, get_judge
from kedit.zoo import model_path
from kedit.zoo.chatworld import build_chat_world
from kedit.zoo.judges import train_judges


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    """A tiny, randomly initialised GPT-2 sequence classifier with three labels, on disk."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    folder = tmp_path_factory.mktemp("classifier")
    tokenizer = AutoTokenizer.from_pretrained(model_path("tiny-gpt2"))
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64, num_labels=3,
        pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TEXTS = ["I love Oslo!", "Oslo makes me nervous.", "Step 1, climb the tower.", "Lisbon."]


def test_hugging_face_classifier_with_a_label_map(classifier_folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    mapping = {"LABEL_0": "neuroticism", "LABEL_1": "extraversion", 2: "agreeableness"}
    judge = get_judge("personality", str(classifier_folder), mapping)
    assert judge.name == str(classifier_folder) and judge.kind == "personality"
    labels = judge(TEXTS)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_folder)
    tokenizer = AutoTokenizer.from_pretrained(classifier_folder)
    expected = []
    for text in TEXTS:  # one text at a time: no padding involved
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        expected.append(["neuroticism", "extraversion", "agreeableness"][int(logits.argmax())])
    assert labels == expected


def test_label_map_is_checked(classifier_folder):
    folder = str(classifier_folder)
    with pytest.raises(ValueError, match="needs a mapping from its labels"):
        get_judge("safety", folder)
    with pytest.raises(ValueError, match="'toxic' is not a safety label"):
        get_judge("safety", folder, {"LABEL_0": "toxic"})
    with pytest.raises(ValueError, match="'LABEL_9' is not a label of"):
        get_judge("safety", folder, {"LABEL_9": "safe"})
    with pytest.raises(ValueError, match="the labels LABEL_2 of .* are unmapped"):
        get_judge("safety", folder, {"LABEL_0": "safe", "LABEL_1": "unsafe"})
    with pytest.raises(ValueError, match="kind: expected one of safety, personality"):
        get_judge("toxicity")


def test_a_callable_judge_is_checked():
    judge = get_judge("safety", lambda texts: ["unsafe" if "Step" in t else "safe" for t in texts])
    assert judge(TEXTS) == ["safe", "safe", "unsafe", "safe"]
    wrong = get_judge("safety", lambda texts: ["fine"] * len(texts))
    with pytest.raises(ValueError, match="label 'fine' is not one of safe, unsafe"):
        wrong(TEXTS)
    short = get_judge("safety", lambda texts: ["safe"])
    with pytest.raises(ValueError, match="returned 1 labels for 4 texts"):
        short(TEXTS)


def test_a_zoo_model_folder_brings_its_judges(tmp_path):
    train_judges(build_chat_world(), tmp_path)
    for kind in LABELS:
        judge = get_judge(kind, str(tmp_path))
        assert judge.name.startswith(str(tmp_path)) and judge.kind == kind
    safety = get_judge("safety", str(tmp_path))
    assert safety(TEXTS) == ["safe", "safe", "unsafe", "safe"]
    trait = get_judge("personality", str(tmp_path))
    assert trait(TEXTS[:2]) == ["extraversion", "neuroticism"]


def test_the_default_judge_needs_its_model(monkeypatch):
    from kedit import zoo

    monkeypatch.setattr(zoo, "list_models", lambda: ["tiny-gpt2"])
    with pytest.raises(ValueError, match="judge: the default is tiny-chat's bundled judge"):
        get_judge("safety")
