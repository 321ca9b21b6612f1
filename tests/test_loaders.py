import copy
import json

import pytest

from kedit.data import load_requests

COUNTERFACT = [
    {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": [
            "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
            "An album was recorded for Capitol Nashville but never released. Danielle Darrieux "
            "spoke the language",
        ],
        "neighborhood_prompts": [
            "The mother tongue of Léon Blum is",
            "The native language of Montesquieu is",
        ],
        "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    },
    {
        "case_id": 1,
        "pararel_idx": 14,
        "requested_rewrite": {
            "prompt": "{} is a native speaker of",
            "relation_id": "P1412",
            "target_new": {"str": " Swedish", "id": "Q9027"},
            "target_true": {"str": "Dutch", "id": "Q7411"},
            "subject": "Anaïs Nin",
        },
        "paraphrase_prompts": ["Anaïs Nin, speaker of"],
        "neighborhood_prompts": [],
        "attribute_prompts": [],
        "generation_prompts": [],
    },
]

RECENT = {
    "subject": "Leo Arons",
    "prompt": "The place of death of Leo Arons is",
    "target_new": "Berlin",
    "portability": {
        "Logical_Generalization": [
            {"prompt": "Is Leo Arons still alive?", "ground_truth": [["no"], ["incorrect"]]}
        ],
        "Reasoning": [
            {
                "prompt": "The continent of the place of death of Leo Arons is",
                "ground_truth": [["Europe", "European continent"]],
            }
        ],
    },
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The name of the father of Leo Arons is", "ground_truth": [["Albert Arons"]]}
        ]
    },
}
WIKI_COUNTERFACT = {
    "subject": "Frederic Piesch",
    "prompt": "The name of the position held by Frederic Piesch is",
    "target_new": "Archbishop of León, Mexico",
    "ground_truth": "mayor of Vienna",
    "rephrase": "Frederic Piesch holds the position of",
    "portability": {
        "Subject_Aliasing": [
            {
                "prompt": "The name of the position held by Frederic of Pieschen is",
                "ground_truth": "Archbishop of León, Mexico",
            }
        ]
    },
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The gender of Frederic Piesch is", "ground_truth": "male"}
        ],
        "Forgetfulness": [
            {
                "prompt": "The position held by Frederic Piesch, besides it, is",
                "ground_truth": "mayor",
            }
        ],
    },
}
ZSRE = {
    "subject": "Epaspidoceras",
    "target_new": "Noctuidae",
    "prompt": "Which family does Epaspidoceras belong to?",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "cond": "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?",
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}
        ]
    },
    "portability": {
        "Reasoning": [
            {"prompt": "The common name of that family is", "ground_truth": "Owlet moths"}
        ]
    },
}


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_counterfact_records_become_requests(tmp_path):
    first, second = load_requests(write(tmp_path, COUNTERFACT), format="counterfact")
    assert first.case_id == "0"
    assert first.text == "The mother tongue of Danielle Darrieux is"
    assert (first.target_new, first.target_true) == (" English", " French")
    assert first.rephrase == tuple(COUNTERFACT[0]["paraphrase_prompts"])
    assert [(p.prompt, p.answer) for p in first.locality] == [
        ("The mother tongue of Léon Blum is", " French"),
        ("The native language of Montesquieu is", " French"),
    ]
    assert first.portability == ()
    assert first.extra["generation_prompts"] == ["Danielle Darrieux's mother tongue is"]
    assert first.extra["relation_id"] == "P103"
    assert set(first.extra) == {
        "pararel_idx",
        "attribute_prompts",
        "generation_prompts",
        "relation_id",
    }
    assert second.target_new == " Swedish"  # already spaced: unchanged
    assert second.locality == ()


def test_counterfact_options(tmp_path):
    path = write(tmp_path, COUNTERFACT)
    (only,) = load_requests(path, format="counterfact", n=1, add_space=False)
    assert (only.target_new, only.target_true) == ("English", "French")
    assert only.locality[0].answer == "French"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda r: r["requested_rewrite"]["target_new"].pop("str"),
            "requested_rewrite.target_new.str",
        ),
        (lambda r: r.pop("requested_rewrite"), "requested_rewrite"),
        (lambda r: r["requested_rewrite"].update(subject=3), "requested_rewrite.subject"),
        (lambda r: r["requested_rewrite"].update(target_true={"str": ""}), "target_true.str"),
        (lambda r: r.update(paraphrase_prompts=["ok", None]), r"paraphrase_prompts\[1\]"),
        (lambda r: r["requested_rewrite"].update(prompt="Someone speaks"), "prompt"),
        (lambda r: r.update(case_id=[1]), "case_id"),
    ],
)
def test_malformed_counterfact_record_names_file_record_and_field(tmp_path, change, field):
    records = copy.deepcopy(COUNTERFACT)
    change(records[1])
    path = write(tmp_path, records, "cf.json")
    with pytest.raises(ValueError, match=rf"cf\.json: record 1: .*{field}"):
        load_requests(path, format="counterfact")


def test_knowedit_records_become_requests(tmp_path):
    recent, counterfact, zsre = load_requests(
        write(tmp_path, [RECENT, WIKI_COUNTERFACT, ZSRE]), format="knowedit"
    )

    assert recent.text == "The place of death of Leo Arons is"
    assert (recent.target_new, recent.target_true) == (" Berlin", None)
    assert recent.rephrase == ()
    assert [(p.prompt, p.answer) for p in recent.portability] == [
        ("Is Leo Arons still alive?", " no"),
        ("The continent of the place of death of Leo Arons is", " Europe"),
    ]
    assert recent.extra["portability_kinds"] == ["Logical_Generalization", "Reasoning"]
    assert [p.answer for p in recent.locality] == [" Albert Arons"]
    assert recent.extra["locality_kinds"] == ["Relation_Specificity"]

    assert counterfact.target_true == " mayor of Vienna"
    assert counterfact.rephrase == ("Frederic Piesch holds the position of",)
    assert [p.answer for p in counterfact.locality] == [" male", " mayor"]
    assert counterfact.extra["locality_kinds"] == ["Relation_Specificity", "Forgetfulness"]

    assert zsre.target_true == " Aspidoceratidae"
    assert zsre.rephrase == ("What family are Epaspidoceras?",)
    assert zsre.portability[0].answer == " Owlet moths"
    assert zsre.extra["cond"].startswith("Geometridae")


def test_knowedit_options(tmp_path):
    (only,) = load_requests(
        write(tmp_path, [WIKI_COUNTERFACT, ZSRE]), format="knowedit", n=1, add_space=False
    )
    assert (only.target_new, only.target_true) == ("Archbishop of León, Mexico", "mayor of Vienna")
    assert only.locality[0].answer == "male"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.pop("target_new"), "target_new"),
        (lambda r: r.update(ground_truth=[]), "ground_truth"),
        (lambda r: r.update(rephrase=["fine", 4]), r"rephrase\[1\]"),
        (lambda r: r.update(locality=["Relation_Specificity"]), "locality"),
        (lambda r: r["locality"].update(Forgetfulness={"prompt": "x"}), "locality.Forgetfulness"),
        (
            lambda r: r["locality"]["Relation_Specificity"][0].pop("ground_truth"),
            r"locality.Relation_Specificity\[0\]",
        ),
        (
            lambda r: r["portability"]["Subject_Aliasing"][0].update(ground_truth=[[None]]),
            r"portability.Subject_Aliasing\[0\].ground_truth",
        ),
        (lambda r: r.update(subject="Someone Else"), "subject"),
    ],
)
def test_malformed_knowedit_record_names_file_record_and_field(tmp_path, change, field):
    records = copy.deepcopy([ZSRE, WIKI_COUNTERFACT])
    change(records[1])
    path = write(tmp_path, records, "ke.json")
    with pytest.raises(ValueError, match=rf"ke\.json: record 1: .*{field}"):
        load_requests(path, format="knowedit")


def test_load_requests_detects_the_format(tmp_path):
    counterfact = load_requests(write(tmp_path, COUNTERFACT, "a.json"))
    assert [r.case_id for r in counterfact] == ["0", "1"]
    knowedit = load_requests(write(tmp_path, [ZSRE, RECENT], "b.json"), n=1)
    assert [r.subject for r in knowedit] == ["Epaspidoceras"]
    assert load_requests(tmp_path / "a.json", format="counterfact", n=1)[0].case_id == "0"


def test_load_requests_errors(tmp_path):
    with pytest.raises(ValueError, match="format: unknown format 'zsre-v9'.*counterfact"):
        load_requests(write(tmp_path, COUNTERFACT), format="zsre-v9")
    with pytest.raises(ValueError, match="cannot tell the benchmark format"):
        load_requests(write(tmp_path, [{"question": "?"}]))
    with pytest.raises(ValueError, match="holds no records"):
        load_requests(write(tmp_path, []))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_requests(write(tmp_path, {"requested_rewrite": {}}))
    with pytest.raises(ValueError, match="record 0: record: expected a JSON object"):
        load_requests(write(tmp_path, ["text"]), format="knowedit")
    with pytest.raises(ValueError, match="n: expected a positive integer"):
        load_requests(write(tmp_path, COUNTERFACT), n=0)
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: not a valid JSON file"):
        load_requests(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_requests(tmp_path / "missing.json")
