"""Unlearning data: TOFU files as published (JSON lines named .json, or JSON arrays), KnowUnDo's
split files (a list holding one {train, val} object), kedit's plain files, benchmark specs read
from a local copy of the hub layout or from the hub, and the tinyworld forget task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kedit.data.unlearn_items import UnlearnItem, as_items
from kedit.data.unlearning import load_unlearning, load_unlearning_benchmark
from kedit.zoo import CORPUS_FILE, build_world
from kedit.zoo.forget_task import (
    PRIVATE_RELATIONS,
    PUBLIC_RELATIONS,
    build_forget_task,
    perturbed_answers,
    write_forget_task,
)

FIXTURES = Path(__file__).parent / "data" / "real-formats"  # real TOFU records (TOFU.md)


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def test_tofu_files_read_as_published():
    records = _lines("tofu_forget01.jsonl")
    items = load_unlearning(FIXTURES / "tofu_forget01.jsonl")
    assert items.format == "tofu" and len(items) == len(records) == 5
    for item, record in zip(items, records, strict=True):
        assert item.prompt == record["question"]
        assert item.answer == " " + record["answer"]
        assert item.perturbed == () and item.paraphrased_answer is None
    # TOFU's \/ escapes are JSON's: the date reads with a plain slash.
    assert "08/09/1956" in items[0].prompt


def test_tofu_perturbed_rows_keep_their_wrong_answers():
    records = _lines("tofu_forget01_perturbed.jsonl")
    items = load_unlearning(FIXTURES / "tofu_forget01_perturbed.jsonl")
    for item, record in zip(items, records, strict=True):
        assert item.perturbed == tuple(" " + a for a in record["perturbed_answer"])
        assert len(item.perturbed) == 5
        assert item.paraphrased_answer == " " + record["paraphrased_answer"]
    world_facts = load_unlearning(FIXTURES / "tofu_world_facts_perturbed.jsonl")
    assert [(i.answer, i.perturbed) for i in world_facts][0] == (
        " Paris",
        (" Berlin", " London", " Madrid"),
    )


def test_tofu_json_lines_named_json_and_json_arrays_read_alike(tmp_path):
    lines = tmp_path / "retain90.json"  # as on the hub: JSON lines in a .json file
    shutil.copy(FIXTURES / "tofu_retain90.jsonl", lines)
    array = tmp_path / "retain90_array.json"  # as some copies hold it
    array.write_text(json.dumps(_lines("tofu_retain90.jsonl"), indent=1))
    expected = list(load_unlearning(FIXTURES / "tofu_retain90.jsonl"))
    assert list(load_unlearning(lines)) == expected == list(load_unlearning(array))
    assert len(expected) == 5


def test_tofu_benchmark_from_a_local_copy_of_the_hub_layout(tmp_path):
    shutil.copy(FIXTURES / "tofu_forget01_perturbed.jsonl", tmp_path / "forget01_perturbed.json")
    shutil.copy(FIXTURES / "tofu_retain90.jsonl", tmp_path / "retain99.json")
    data = load_unlearning_benchmark("tofu:forget01", root=tmp_path)
    assert len(data.forget) == 3 and all(len(item.perturbed) == 5 for item in data.forget)
    assert [i.prompt for i in data.retain] == [r["question"] for r in _lines("tofu_retain90.jsonl")]
    (tmp_path / "forget01_perturbed.json").unlink()
    shutil.copy(FIXTURES / "tofu_forget01.jsonl", tmp_path / "forget01.jsonl")
    assert len(load_unlearning_benchmark("tofu:forget01", root=tmp_path).forget) == 5
    with pytest.raises(ValueError, match=r"forget splits are .*forget10.*got 'forget02'"):
        load_unlearning_benchmark("tofu:forget02", root=tmp_path)


KNOWUNDO_TRAIN = [
    {"text": "What is the home address of Jane Roe?", "labels": "Jane Roe lives at 12 Elm St."},
    {"text": "Who is Jane Roe's employer?", "labels": "She works for Acme Corp."},
]
KNOWUNDO_VAL = [{"text": "Where does Jane Roe live?", "labels": "At 12 Elm St."}]


def _knowundo_file(path: Path) -> Path:
    """A split file in KnowUnDo's structure (SOURCES.md §4: a list holding one {train, val})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"train": KNOWUNDO_TRAIN, "val": KNOWUNDO_VAL}]))
    return path


def test_knowundo_rows_join_text_and_labels_as_its_code_does(tmp_path):
    path = _knowundo_file(tmp_path / "privacy" / "unlearn.json")
    items = load_unlearning(path)
    assert items.format == "knowundo"
    assert [(i.prompt, i.answer) for i in items] == [
        (row["text"], "\n\n" + row["labels"]) for row in KNOWUNDO_TRAIN
    ]
    assert [i.prompt for i in load_unlearning(path, part="val")] == [KNOWUNDO_VAL[0]["text"]]
    assert len(load_unlearning(path, part="all")) == 3
    assert load_unlearning(path, separator=" ")[0].answer == " " + KNOWUNDO_TRAIN[0]["labels"]
    flat = tmp_path / "rows.json"
    flat.write_text(json.dumps(KNOWUNDO_TRAIN))
    assert list(load_unlearning(flat)) == list(items)
    with pytest.raises(ValueError, match="part: expected one of"):
        load_unlearning(path, part="test")


def test_knowundo_bad_rows_are_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"train": [{"text": "q", "labels": ""}], "val": []}]))
    with pytest.raises(ValueError, match=r"bad.json: record 0: labels: expected a non-empty"):
        load_unlearning(path)
    assert load_unlearning(path, skip_bad=True).skipped


def test_knowundo_benchmark_locally_and_from_the_hub(tmp_path, monkeypatch):
    for split in ("unlearn", "retention"):
        _knowundo_file(tmp_path / "privacy" / f"{split}.json")
    data = load_unlearning_benchmark("knowundo:privacy", root=tmp_path)
    assert len(data.forget) == len(data.retain) == 2

    import datasets

    asked = []

    def fake_hub(path, name=None, split=None):
        asked.append((path, name, split))
        return [{"train": KNOWUNDO_TRAIN, "val": KNOWUNDO_VAL}]

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    from_hub = load_unlearning_benchmark("knowundo:copyright")
    assert asked == [
        ("zjunlp/KnowUnDo", "copyright", "unlearn"),
        ("zjunlp/KnowUnDo", "copyright", "retention"),
    ]
    assert from_hub.forget.source == "hf://zjunlp/KnowUnDo/copyright[unlearn]"
    assert list(from_hub.forget) == list(data.forget)
    with pytest.raises(ValueError, match="configs .*got 'medical'"):
        load_unlearning_benchmark("knowundo:medical")
    with pytest.raises(ValueError, match="expected knowundo:CONFIG or tofu:SPLIT"):
        load_unlearning_benchmark("muse:news")


def test_plain_files_and_format_errors(tmp_path):
    path = tmp_path / "forget.jsonl"
    rows = [{"prompt": "Mira lives in", "answer": "Lisbon", "perturbed_answer": ["Oslo"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert list(load_unlearning(path)) == [UnlearnItem("Mira lives in", " Lisbon", (" Oslo",))]
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"src": "x", "alt": "y"}]))
    with pytest.raises(ValueError, match="cannot tell the unlearning format"):
        load_unlearning(odd)
    with pytest.raises(ValueError, match="format: unknown format 'zsre'"):
        load_unlearning(path, format="zsre")
    with pytest.raises(ValueError, match="part: not an option of format 'plain'"):
        load_unlearning(path, part="val")


def test_as_items_takes_pairs_dicts_and_items_and_names_bad_ones():
    given = [("a", " b"), {"prompt": "c", "answer": " d"}, UnlearnItem("e", " f")]
    assert [i.pair for i in as_items(given, "forget")] == [("a", " b"), ("c", " d"), ("e", " f")]
    with pytest.raises(ValueError, match=r"forget\[1\]: answer: expected a non-empty string"):
        as_items([("a", " b"), ("c", "")], "forget")
    with pytest.raises(ValueError, match="retain: expected at least one item"):
        as_items([], "retain")
    with pytest.raises(ValueError, match="forget: expected a list of"):
        as_items("a prompt", "forget")


def test_forget_task_splits_private_from_public_and_people_apart(tmp_path):
    world = build_world()
    task = build_forget_task(world, share=0.05)
    assert len(task.people) == round(0.05 * len(world.people))
    groups = [set(task.people), set(task.retain_people)]
    other = {f.subject for f in task.other_people}
    assert not groups[0] & groups[1] and not other & (groups[0] | groups[1])
    assert {(f.subject, f.relation) for f in task.forget} == {
        (p, r) for p in task.people for r in PRIVATE_RELATIONS
    }
    assert {f.relation for f in task.in_domain} == set(PUBLIC_RELATIONS)
    # Paraphrases and in-domain prompts are held-out templates: never trained on, never in retain.
    trained = {f.prompt for f in task.forget} | {f.prompt for f in task.retain}
    assert not trained & {f.prompt for f in task.forget_paraphrase + task.in_domain}
    names = [n for p in task.people for n in (p, world.aliases.get(p)) if n]
    assert task.general and not any(n in doc for doc in task.general for n in names)
    assert set(task.general) <= set(CORPUS_FILE.read_text().splitlines())
    for fact in task.forget[:8]:
        wrong = perturbed_answers(world, fact)
        assert len(set(wrong)) == 4 and fact.answer not in wrong
        assert {w.strip() for w in wrong} <= set(world.candidates(fact.relation))

    paths = write_forget_task(world, task, tmp_path)
    forget = load_unlearning(tmp_path / "forget.jsonl")
    assert [i.pair for i in forget] == [(f.prompt, f.answer) for f in task.forget]
    assert forget[0].perturbed == tuple(perturbed_answers(world, task.forget[0]))
    assert (tmp_path / "general.txt").read_text().splitlines() == task.general
    assert len(paths) == 6
    with pytest.raises(ValueError, match="share: expected a number between 0 and 1"):
        build_forget_task(world, share=1.5)
