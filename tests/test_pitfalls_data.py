"""ConflictEdit and RoundEdit loaders on records of the benchmarks' own files, the facts each
pitfall is scored on, and the tinyworld files in those formats."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from kedit.data import detect_format, load_conflictedit, load_requests, load_roundedit
from kedit.pitfalls.probes import conflict_probes, multi_label_back
from kedit.zoo import DATA_DIR, build_world
from kedit.zoo.pitfalls_data import (
    CONFLICT_FILE,
    CONFLICT_PROMPTS_FILE,
    ROUND_FILES,
    ROUND_PROMPTS_FILE,
    write_pitfalls_files,
)

REAL = Path(__file__).parent / "data" / "pitfalls"


def test_reverse_records_as_in_the_file():
    cases = load_conflictedit(REAL / "conflictedit_reverse_edit.json")
    assert [c.kind for c in cases] == ["reverse"] * 3
    goya = cases[0]
    assert goya.rule == "P800>P170" and goya.prerequisites == ()
    first, second = goya.requests
    assert (first.text, first.target_true, first.target_new) == (
        "The notable work of Francisco de Goya is",
        " The Second of May 1808",
        " landscape with fighting bulls",
    )
    assert (second.text, second.target_new) == (
        "The creater of landscape with fighting bulls is",
        " Richard Strauss",
    )
    # P800 is not in the paraphrase file (its first three relations): the prompt alone.
    assert first.rephrase == () and goya.edits[0].templates == ("The notable work of {} is",)
    # P22 is: its prompt, then its ten paraphrases.
    father = cases[2].edits[0]
    assert father.templates[0] == "The father of {} is" and len(father.templates) == 11
    assert father.prompts[1] == "The biological father of Ankhnesneferibre is"
    assert cases[2].new_objects[1] == " Marie Prinzessin von Croÿ"


def test_reverse_conflict_facts():
    probes = conflict_probes(load_conflictedit(REAL / "conflictedit_reverse_edit.json")[0])
    # k_old: what the first edit wrote; k_new: what the reversed second edit implies.
    assert probes.old.prompts[0] == "The notable work of Francisco de Goya is"
    assert probes.new.prompts[0] == "The notable work of Richard Strauss is"
    assert probes.old.object == probes.new.object == " landscape with fighting bulls"
    assert probes.tied is None


def test_composite_records_and_facts():
    case = load_conflictedit(REAL / "conflictedit_composite_edit.json")[0]
    assert case.kind == "composite" and case.rule == "P25&P26>P22"
    assert case.prerequisites == (0,) and len(case.triples) == 3
    assert case.extra["true_object"] == " Gena Rowlands"
    probes = conflict_probes(case)
    assert probes.tied.prompts[0] == "The mother of Archduchess Maria Josepha of Austria is"
    assert probes.tied.object == " Maria Theresa of Austria"
    assert probes.old.prompts[0] == "The spouse of Maria Theresa of Austria is"
    assert (probes.old.object, probes.new.object) == (" Gena Rowlands", " John Forbes-Robertson")


def test_coverage_records_have_no_rule_and_edit_one_fact_twice():
    case = load_conflictedit(REAL / "conflictedit_coverage_edit.json")[0]
    assert case.kind == "coverage" and case.rule is None
    probes = conflict_probes(case)
    assert probes.old.prompts == probes.new.prompts
    assert (probes.old.object, probes.new.object) == (" Ludwig Cromme", " Heinz Prüfer")


def test_round_records_as_in_the_file():
    easy = load_roundedit(REAL / "roundedit_easy.json")
    assert easy[0].kind == "1-3@P366" and easy[0].fact.subject == "fpart"
    # The edited object first, then the other true objects in the file's order.
    assert easy[0].true_objects == (
        " data migration",
        " data synchronization",
        " computer file management",
    )
    assert (easy[0].edit.target_true, easy[0].edit.target_new) == (" data migration", " franking")
    assert (easy[0].back.target_true, easy[0].back.target_new) == (" franking", " data migration")
    hard = load_roundedit(REAL / "roundedit_hard.json")
    assert len(hard[1].true_objects) == 7 and hard[1].true_objects[0] == " Icarus"
    assert len(hard[0].fact.templates) == 11  # P69's prompt and its ten paraphrases
    mle = multi_label_back(hard[0])
    assert mle.targets == (" Duarte High School", " University of Southern California")
    assert mle.text == "Cary-Hiroyuki Tagawa was educated at"


def test_formats_are_detected_and_read_as_requests():
    for name, format, count in [
        ("conflictedit_reverse_edit.json", "conflictedit", 6),
        ("conflictedit_coverage_edit.json", "conflictedit", 6),
        ("roundedit_hard.json", "roundedit", 3),
    ]:
        data = json.loads((REAL / name).read_text())
        assert detect_format(data) == format
        loaded = load_requests(REAL / name)
        assert loaded.format == format and len(loaded) == count
    assert load_requests(REAL / "conflictedit_reverse_edit.json", n=1)[1].case_id == "0/1"


def test_prompt_files_are_found_beside_the_data_or_given(tmp_path, caplog):
    shutil.copy(REAL / "roundedit_hard.json", tmp_path / "hard.json")
    with caplog.at_level(logging.WARNING, logger="kedit.data"):
        alone = load_roundedit(tmp_path / "hard.json")
    assert alone[0].fact.templates == ("{} was educated at",)
    assert "no round_prompts.json" in caplog.text
    given = load_roundedit(tmp_path / "hard.json", prompts={"P69": ["{} studied at"]})
    assert given[0].fact.templates == ("{} was educated at", "{} studied at")
    shutil.copy(REAL / "roundedit_round_prompts.json", tmp_path / "round_prompts.json")
    assert len(load_roundedit(tmp_path / "hard.json")[0].fact.templates) == 11
    shutil.copy(REAL / "roundedit_round_prompts.json", tmp_path / "a_round_prompts.json")
    (tmp_path / "round_prompts.json").unlink()
    shutil.copy(REAL / "roundedit_round_prompts.json", tmp_path / "b_round_prompts.json")
    with pytest.raises(ValueError, match="several paraphrase files"):
        load_roundedit(tmp_path / "hard.json")
    with pytest.raises(ValueError, match=r"P69\[0\]"):
        load_roundedit(tmp_path / "hard.json", prompts={"P69": ["no slot"]})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.update(type="sideways"), "type"),
        (lambda r: r["edits"].pop(), "edits"),
        (lambda r: r.update(prerequisites=[7]), "prerequisites"),
        (lambda r: r["edits"][0]["relation"].update(prompt="no slot"), r"edits\[0\].relation"),
        (lambda r: r["edits"][1].pop("new_object"), r"edits\[1\].new_object"),
    ],
)
def test_bad_conflict_records_name_the_field(tmp_path, change, field):
    records = json.loads((REAL / "conflictedit_composite_edit.json").read_text())
    change(records[1])
    path = tmp_path / "composite_edit.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=f"record 1: {field}"):
        load_conflictedit(path, prompts={})
    assert len(load_conflictedit(path, prompts={}, skip_bad=True)) == 2


def test_a_round_record_whose_object_is_not_true_is_refused(tmp_path):
    records = json.loads((REAL / "roundedit_easy.json").read_text())
    records[0]["edit"]["object"]["label"] = "nothing of the kind"
    path = tmp_path / "easy.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match="record 0: edit.object"):
        load_roundedit(path, prompts={})


@pytest.fixture(scope="module")
def world():
    return build_world()


def test_tinyworld_pitfalls_files_are_current(world, tmp_path):
    for path in write_pitfalls_files(world, tmp_path):
        assert path.read_text() == (DATA_DIR / path.name).read_text(), path.name


def test_tinyworld_conflict_cases_follow_the_world(world):
    cases = load_conflictedit(DATA_DIR / CONFLICT_FILE)
    assert {c.kind for c in cases[:3]} == {"reverse", "composite", "coverage"}
    for case in cases:
        first, second = case.requests
        assert first.target_new != first.target_true and second.target_new != second.target_true
        probes = conflict_probes(case)
        if case.kind == "reverse":
            # The implied fact is new: person' did not already work for company'.
            person, company = probes.new.subject, probes.new.object.strip()
            assert world.facts[(person, "employer")] != company
            assert first.target_true == " " + world.facts[(first.subject, "employer")]
        elif case.kind == "composite":
            city = probes.tied.object.strip()
            assert world.facts[(probes.tied.subject, "lives_in")] == city
            assert first.subject == city and case.extra["true_object"] == first.target_new
            assert len({first.target_true, first.target_new, second.target_new}) == 3
        else:
            assert second.target_true == first.target_new
    assert len(json.loads((DATA_DIR / CONFLICT_PROMPTS_FILE).read_text())) == 7


@pytest.mark.parametrize("difficulty", sorted(ROUND_FILES))
def test_tinyworld_round_cases(world, difficulty):
    cases = load_roundedit(DATA_DIR / ROUND_FILES[difficulty])
    assert len(json.loads((DATA_DIR / ROUND_PROMPTS_FILE).read_text())) == 2
    for case in cases:
        assert case.kind == f"1-{len(case.true_objects)}@{case.fact.relation_id}"
        objects = {o.strip() for o in case.true_objects}
        person, passed = case.fact.subject, case.new_object.strip()
        assert passed not in objects
        if case.fact.relation_id == "P551":
            assert world.facts[(person, "lives_in")] in objects
            assert {world.city_country[c] for c in objects} == {
                world.city_country[world.facts[(person, "lives_in")]]
            }
            same_kind = passed in world.cities
        else:
            assert world.facts[(person, "language")] in objects
            same_kind = passed in world.languages
        assert same_kind == (difficulty == "hard")
