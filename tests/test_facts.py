"""Facts for the mechanism analyses: the LRE relation files Knowledge Circuits uses (real
fixtures, read as they are), `{prompt, subject, answer}` records and benchmark files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kedit.data.facts import Fact, load_facts, lre_facts
from kedit.zoo import benchmark_path

LRE = Path(__file__).parent / "data" / "real-formats" / "lre"  # see its SOURCES.md


@pytest.fixture(scope="module")
def lre_folder() -> Path:
    return LRE


def test_an_lre_relation_gives_every_template_with_every_sample_template_by_template(lre_folder):
    facts = load_facts(lre_folder / "factual" / "city_in_country.json")
    raw = json.loads((lre_folder / "factual" / "city_in_country.json").read_text())
    templates, samples = raw["prompt_templates"], raw["samples"]
    assert len(facts) == len(templates) * len(samples) == 10
    expected = [
        (template, sample["subject"], " " + sample["object"])
        for template in templates
        for sample in samples
    ]
    assert [(f.prompt, f.subject, f.answer) for f in facts] == expected
    assert facts[0].text == "New York City is part of" and facts[0].relation == "city in country"
    assert facts.format == "lre"


def test_the_zero_shot_templates_and_n(lre_folder):
    path = lre_folder / "linguistic" / "adj_antonym.json"
    facts = load_facts(path, templates="prompt_templates_zs", n=3)
    assert [f.text for f in facts] == [
        "The opposite of love is",
        "The opposite of create is",
        "The opposite of happy is",
    ]


def test_a_folder_of_relations_is_read_recursively(lre_folder, tmp_path):
    shutil.copytree(lre_folder, tmp_path / "lre")
    facts = load_facts(tmp_path / "lre")
    assert {f.relation for f in facts} == {"city in country", "adjective antonym"}


def test_lre_errors_name_the_field(lre_folder):
    raw = json.loads((lre_folder / "factual" / "city_in_country.json").read_text())
    with pytest.raises(ValueError, match="extra: not a field of an LRE relation"):
        lre_facts({**raw, "extra": 1}, "r.json")
    with pytest.raises(ValueError, match=r"prompt_templates\[0\]: expected one '\{\}'"):
        lre_facts({**raw, "prompt_templates": ["no slot"]}, "r.json")
    broken = {**raw, "samples": [{"subject": "Oslo"}]}
    with pytest.raises(ValueError, match="samples: record 0: object: missing"):
        lre_facts(broken, "r.json")


def test_records_and_benchmark_files(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"prompt": "{} lives in", "subject": "Mira Olsen", "answer": "Oslo"}\n')
    assert load_facts(path) == [Fact("{} lives in", "Mira Olsen", " Oslo")]
    unanswered = tmp_path / "open.json"
    unanswered.write_text('[{"prompt": "Mira Olsen lives in", "subject": "Mira Olsen"}]')
    assert load_facts(unanswered)[0].answer is None
    facts = load_facts(benchmark_path("counterfact"), n=2)
    raw = json.loads(benchmark_path("counterfact").read_text())[0]["requested_rewrite"]
    assert facts[0] == Fact(raw["prompt"], raw["subject"], " " + raw["target_true"]["str"])


def test_a_fact_checks_its_fields():
    with pytest.raises(ValueError, match="neither"):
        Fact("lives in", "Mira Olsen", " Oslo")
    with pytest.raises(ValueError, match="subject"):
        Fact("{} lives in", "", " Oslo")
    assert Fact("Mira Olsen lives in", "Mira Olsen").template == "{} lives in"
