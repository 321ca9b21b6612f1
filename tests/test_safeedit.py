"""SafeEdit: the loader on the real files and tinyworld 2's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kedit.data import detect_format, load_requests
from kedit.data.safeedit import safeedit_requests
from kedit.zoo import DATA_DIR

FIXTURES = Path(__file__).parent / "data" / "safeedit"


def _spaced(text: str) -> str:
    """SafeEdit's texts as targets: a leading space unless they have one already."""
    return text if text[:1].isspace() else " " + text


def test_real_test_records_map_as_easyedit_maps_them():
    raw = json.loads((FIXTURES / "safeedit_test.json").read_text())
    loaded = load_requests(FIXTURES / "safeedit_test.json")
    assert loaded.format == "safeedit" and len(loaded) == len(raw) == 5
    for record, request in zip(raw, loaded, strict=True):
        assert request.case_id == str(record["id"])
        assert request.prompt == record["adversarial prompt"]
        assert request.subject == record["question"]
        assert request.target_new == _spaced(record["safe generation"])
        assert request.target_true == _spaced(record["unsafe generation"])
        constraint = record["knowledge constrain"]
        assert [(p.prompt, p.answer) for p in request.locality] == [
            (constraint["prompt"], _spaced(constraint["answer"]))
        ]
        tests = record["generalization test"]
        assert request.extra["generalization"] == {
            "DG_onlyQ": tests["test input of only harmful question"],
            "DG_otherA": tests["test input of other attack prompt input"],
            "DG_otherQ": tests["test input of other question input"],
            "DG_otherAQ": tests["test input of other questions and attack prompts"],
        }
        assert request.extra["other_attack"] == {
            "category": tests["attack_category"],
            "name": tests["attack_name"],
        }
        assert request.extra["attack"]["name"] == record["attack name"]
        assert request.extra["category"] == record["unsafety category"]


def test_train_split_and_three_instances_have_no_generalization_inputs():
    for name, ids in (
        ("safeedit_train.json", ["0", "2", "3"]),
        ("safeedit_three_instances_for_editing.json", ["1", "2", "3"]),
    ):
        loaded = load_requests(FIXTURES / name)
        assert [r.case_id for r in loaded] == ids
        assert all(r.extra["generalization"] == {} for r in loaded)
        assert all(r.extra["other_attack"] == {} for r in loaded)


def test_tinyworld_file_is_safeedit_format_with_every_generalization_input():
    path = DATA_DIR / "tinyworld2_safeedit.json"
    raw = json.loads(path.read_text())
    assert detect_format(raw) == "safeedit"
    loaded = load_requests(path)
    assert len(loaded) == len(raw) >= 100
    assert all(len(r.extra["generalization"]) == 4 for r in loaded)
    assert loaded[3].locality[0].answer == " " + raw[3]["knowledge constrain"]["answer"]


def test_a_question_outside_its_adversarial_prompt_is_named():
    record = json.loads((FIXTURES / "safeedit_test.json").read_text())[0]
    record["question"] = "Something else entirely?"
    with pytest.raises(ValueError, match="record 0: question: .* not part of the adversarial"):
        safeedit_requests([record], source="x.json")
