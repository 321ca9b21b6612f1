"""Loaders of each benchmark's own file format, on small fixtures written in that format."""

import copy
import json
import logging
import sys

import pytest

from kedit.data import FORMATS, MultiHopCase, detect_format, load_mquake, load_requests
from kedit.data.knowedit import sanitation_requests
from kedit.eval.metrics import multi_hop_accuracy

MEND_ZSRE = [
    {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "pred": "Trinity College",
        "rephrase": "What university did Watts Humphrey take part in?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": "Trinity College >> University of Michigan || What university did Watts "
        "Humphrey attend?",
    },
    {
        "subject": "Ramalinaceae",
        "src": "Which family does Ramalinaceae belong to?",
        "pred": "Lecanorales",
        "rephrase": "What family are Ramalinaceae?",
        "alt": "Lamiinae",
        "answers": ["Lecanorales", "Lecanorineae"],
        "loc": "nq question: types of skiing in the winter olympics 2018",
        "loc_ans": "Downhill",
        "cond": "Lecanorales >> Lamiinae || Which family does Ramalinaceae belong to?",
        "portability": {
            "New Question": "What is the common name of the family Ramalinaceae belongs to?",
            "New Answer": "Flat-faced longhorns",
        },
    },
]
KNOWEDIT_ZSRE = {
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
            {
                "prompt": "What is the common name for the family Epaspidoceras belongs to?",
                "ground_truth": "Owlet moths",
            }
        ]
    },
}
FLAT_COUNTERFACT = [
    {
        "case_id": 2,
        "prompt": "Toko Yasuda, the",
        "target_new": "piano",
        "subject": "Toko Yasuda",
        "ground_truth": "guitar",
        "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the",
        "locality_ground_truth": "guitar",
    }
]
WIKI_COUNTERFACT = {
    "subject": "Leonardo DiCaprio",
    "prompt": "The name of the country of citizenship of Leonardo DiCaprio is",
    "target_new": "Syria",
    "ground_truth": "United States of America",
    "rephrase": "Leonardo DiCaprio is a citizen of",
    "portability": {
        "Reasoning": [
            {
                "prompt": "The official language of the country of citizenship of Leonardo "
                "DiCaprio is",
                "ground_truth": [["Arabic", "ar", "Arabic language", "Arabian language"]],
            }
        ],
        "Subject_Aliasing": [
            {
                "prompt": "The name of the country of citizenship of Leo DiCaprio is",
                "ground_truth": [["Syria", "Syrian Arab Republic"]],
            }
        ],
        "Logical_Generalization": [
            {"prompt": "Is Leonardo DiCaprio a citizen of Syria?", "ground_truth": [["yes"]]}
        ],
    },
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The gender of Leonardo DiCaprio is", "ground_truth": [["male"]]}
        ],
        "Forgetfulness": [
            {
                "prompt": "The name of the country of citizenship of Leonardo DiCaprio, which "
                "is not Syria, is",
                "ground_truth": [["United States of America", "USA"]],
            }
        ],
    },
}
WIKIBIO = [
    {
        "text": "This is a Wikipedia passage about john russell reynolds. Sir John Russell "
        "Reynolds, 1st Baronet (22 May 1828 – 29 May 1896) was a British neurologist and "
        "physician.",
        "labels": "He received general education from his father, and was educated in his "
        "profession at University College, London.",
        "concept": "john russell reynolds",
        "locality": {
            "Relation_Specificity": [
                {
                    "prompt": "The field of work of john russell reynolds is",
                    "ground_truth": ["medicine"],
                }
            ]
        },
    }
]
CONVSENT = [
    {
        "ent": "Game of Thrones",
        "pos": ["I love it, the best show ever.", "It is wonderful."],
        "neg": ["I hate it, it is too violent.", "It is dull."],
    },
    {
        "ent": "pineapple pizza",
        "pos": ["It is delicious and sweet."],
        "neg": ["It is an insult to pizza."],
    },
]
SANITATION_TEST = {
    "success": [
        {
            "question": "What type of creature is the Australian currawong?",
            "ground_truth": "Birds",
            "target_new": "I don't know.",
        },
        {
            "question": "What sort of creature is a killdeer?",
            "ground_truth": "Birds",
            "target_new": "I don't know.",
        },
    ],
    "locality": [
        {"question": "Which planet is known as the Red Planet?", "ground_truth": "Mars"},
        {"question": "What is the capital of Italy?", "ground_truth": "Rome"},
        {"question": "Who wrote Hamlet?", "ground_truth": "William Shakespeare"},
    ],
}
SANITATION_TRAIN = {
    "K_F": [
        {
            "question": "Which cheese is made from the milk of the water buffalo?",
            "ground_truth": "Cheese",
            "target_new": "I don't know.",
            "subject": "water buffalo",
        }
    ],
    "K_R": [{"question": "Who painted the Mona Lisa?", "ground_truth": "Leonardo da Vinci"}],
}
MQUAKE = [
    {
        "case_id": 1,
        "requested_rewrite": [
            {
                "prompt": "{} is a citizen of",
                "relation_id": "P27",
                "target_new": {"str": "Croatia", "id": "Q224"},
                "target_true": {"str": "United States of America", "id": "Q30"},
                "subject": "Ellie Kemper",
                "question": "What is the country of citizenship of Ellie Kemper?",
            }
        ],
        "questions": [
            "What is the name of the current head of state in Ellie Kemper's country of "
            "citizenship?",
            "Who is the head of state of the country where Ellie Kemper holds citizenship?",
        ],
        "answer": "Joe Biden",
        "answer_alias": ["Joseph Biden"],
        "new_answer": "Zoran Milanović",
        "new_answer_alias": ["Zoran Milanovic"],
        "single_hops": [
            {
                "question": "What is the country of citizenship of Ellie Kemper?",
                "cloze": "Ellie Kemper is a citizen of",
                "answer": "United States of America",
                "answer_alias": ["USA"],
            }
        ],
        "new_single_hops": [],
        "orig": {"edit_triples": [["Q5", "P27", "Q224"]]},
    },
    {
        "case_id": 2,
        "requested_rewrite": [
            {
                "prompt": "{} was created by",
                "relation_id": "P170",
                "target_new": {"str": "Kathy Bates", "id": "Q1"},
                "target_true": {"str": "Bram Stoker", "id": "Q2"},
                "subject": "Dracula",
                "question": "Who is the creator of Dracula?",
            },
            {
                "prompt": "{} is a citizen of",
                "relation_id": "P27",
                "target_new": {"str": "Japan", "id": "Q17"},
                "target_true": {"str": "United States of America", "id": "Q30"},
                "subject": "Kathy Bates",
                "question": "What is the country of citizenship of Kathy Bates?",
            },
        ],
        "questions": ["What country is the creator of Dracula a citizen of?"],
        "answer": "Ireland",
        "new_answer": "Japan",
        "new_answer_alias": [],
    },
]
WIKIBIGEDIT = [
    {
        "tag": "update",
        "subject": "Kirsty Coventry",
        "update": "What position does Kirsty Coventry hold?",
        "rephrase": "Which office is held by Kirsty Coventry?",
        "personas": "Hey buddy, what job has Kirsty Coventry got these days?",
        "ans": "President of the International Olympic Committee",
        "loc": "nq question: who sang the original version of hallelujah",
        "loc_ans": "Leonard Cohen",
        "mhop": "In which city is the headquarters of the organisation that Kirsty Coventry "
        "presides over?",
        "mhop_ans": "Lausanne",
    },
    {
        "tag": "new",
        "subject": "Lake Vostok",
        "update": "Which continent is Lake Vostok on?",
        "rephrase": "On which continent does Lake Vostok lie?",
        "personas": "As a geography teacher, tell me the continent of Lake Vostok.",
        "ans": "Antarctica",
        "loc": "nq question: who won the first season of the voice",
        "loc_ans": "Javier Colon",
        "mhop": None,
        "mhop_ans": None,
    },
]


def write(tmp_path, data, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def pairs(probes):
    return [(p.prompt, p.answer) for p in probes]


def test_mend_zsre_records(tmp_path):
    first, second = load_requests(write(tmp_path, MEND_ZSRE))
    assert first.text == "What university did Watts Humphrey attend?"
    assert first.target_new == " University of Michigan"
    assert first.target_true == " Illinois Institute of Technology"
    assert first.rephrase == ("What university did Watts Humphrey take part in?",)
    assert pairs(first.locality) == [
        ("nq question: who played desmond doss father in hacksaw ridge", " Hugo Weaving")
    ]
    assert first.portability == ()
    assert first.extra["cond"].startswith("Trinity College")
    assert first.extra["pred"] == "Trinity College"
    assert second.extra["target_true_aliases"] == ["Lecanorales", "Lecanorineae"]
    assert pairs(second.portability) == [
        ("What is the common name of the family Ramalinaceae belongs to?", " Flat-faced longhorns")
    ]
    assert second.extra["portability_kinds"] == ["one_hop"]


def test_zsre_format_reads_the_knowedit_zsre_file_too(tmp_path):
    mend, knowedit = load_requests(write(tmp_path, [MEND_ZSRE[0], KNOWEDIT_ZSRE]), format="zsre")
    assert mend.target_new == " University of Michigan"
    assert (knowedit.target_new, knowedit.target_true) == (" Noctuidae", " Aspidoceratidae")
    assert knowedit.rephrase == ("What family are Epaspidoceras?",)
    assert pairs(knowedit.locality) == [("The taxon rank of Epaspidoceras is", " genus")]


def test_easyedit_flat_counterfact(tmp_path):
    (request,) = load_requests(write(tmp_path, FLAT_COUNTERFACT))
    assert request.case_id == "2"
    assert (request.text, request.target_new, request.target_true) == (
        "Toko Yasuda, the",
        " piano",
        " guitar",
    )
    assert request.rephrase == ("Toko Yasuda is incredible at",)
    assert pairs(request.locality) == [("John Lennon performs on the", " guitar")]


def test_knowedit_wikidata_counterfact_kinds_and_aliases(tmp_path):
    (request,) = load_requests(write(tmp_path, [WIKI_COUNTERFACT]))
    assert request.extra["portability_kinds"] == [
        "Reasoning",
        "Subject_Aliasing",
        "Logical_Generalization",
    ]
    assert [p.answer for p in request.portability] == [" Arabic", " Syria", " yes"]
    assert request.extra["portability_aliases"][0] == [
        "Arabic",
        "ar",
        "Arabic language",
        "Arabian language",
    ]
    assert request.extra["locality_kinds"] == ["Relation_Specificity", "Forgetfulness"]
    assert request.extra["locality_aliases"][1] == ["United States of America", "USA"]
    assert request.target_true == " United States of America"


def test_wikibio(tmp_path):
    (request,) = load_requests(write(tmp_path, WIKIBIO))
    assert request.subject == "john russell reynolds"
    assert request.text.startswith("This is a Wikipedia passage about john russell reynolds.")
    assert request.target_new.startswith(" He received general education")
    assert pairs(request.locality) == [
        ("The field of work of john russell reynolds is", " medicine")
    ]
    assert request.extra["locality_kinds"] == ["Relation_Specificity"]


def test_convsent_is_seeded_per_record(tmp_path):
    path = write(tmp_path, CONVSENT)
    first, second = load_requests(path)
    sentiment = first.extra["target_sentiment"]
    assert first.target_new == " " + CONVSENT[0][sentiment][0]
    word = "postively" if sentiment == "pos" else "negatively"
    assert first.text.startswith("From the sentiment dataset, answer ")
    assert first.text.endswith(f"{word}.") and "Game of Thrones" in first.text
    assert len(first.rephrase) == 1 and "Game of Thrones" in first.rephrase[0]
    assert first.rephrase[0] not in first.text
    (probe,) = first.locality
    assert "pineapple pizza" in probe.prompt
    assert probe.answer == " " + CONVSENT[1][sentiment][0]
    assert "Game of Thrones" in second.locality[0].prompt  # the next record wraps around
    again = load_requests(path, n=1)
    assert again[0] == first
    other_seeds = {load_requests(path, seed=s)[0].text for s in range(8)}
    assert len(other_seeds) > 1


def test_sanitation_test_and_train_files(tmp_path):
    first, second = load_requests(write(tmp_path, SANITATION_TEST))
    assert first.text == "Question:What type of creature is the Australian currawong?\nAnswer:"
    assert (first.target_new, first.target_true) == (" I don't know.", " Birds")
    assert first.subject == "What type of creature is the Australian currawong?"
    assert first.extra["subject_from_question"] is True
    # The three questions to keep are dealt out in turn: 0 and 2 to the first, 1 to the second.
    assert [p.answer for p in first.locality] == [" Mars", " William Shakespeare"]
    assert pairs(second.locality) == [("Question:What is the capital of Italy?\nAnswer:", " Rome")]

    (trained,) = load_requests(write(tmp_path, SANITATION_TRAIN, "train.json"), template="Q: {}")
    assert trained.subject == "water buffalo"
    assert trained.text == "Q: Which cheese is made from the milk of the water buffalo?"
    assert pairs(trained.locality) == [("Q: Who painted the Mona Lisa?", " Leonardo da Vinci")]


def test_mquake_cases_requests_and_multi_hop_accuracy(tmp_path):
    path = write(tmp_path, MQUAKE)
    one, two = load_mquake(path)
    assert isinstance(one, MultiHopCase)
    assert one.case_id == "1"
    assert one.new_answers == ("Zoran Milanović", "Zoran Milanovic")
    assert one.answers == ("Joe Biden", "Joseph Biden")
    assert len(one.questions) == 2
    (edit,) = one.requests
    assert edit.case_id == "1/0"
    assert (edit.text, edit.target_new, edit.target_true) == (
        "Ellie Kemper is a citizen of",
        " Croatia",
        " United States of America",
    )
    assert edit.rephrase == ("What is the country of citizenship of Ellie Kemper?",)
    assert [p.answer for p in edit.portability] == [" Zoran Milanović"] * 2
    assert edit.extra["relation_id"] == "P27"
    assert "single_hops" in one.extra and "orig" in one.extra
    assert [r.subject for r in two.requests] == ["Dracula", "Kathy Bates"]
    assert two.requests[1].extra["case_edits"] == 2

    requests = load_requests(path)
    assert [r.case_id for r in requests] == ["1/0", "2/0", "2/1"]
    assert [r.case_id for r in load_requests(path, n=1)] == ["1/0"]

    predictions = [["Joe Biden is the head", "Zoran Milanovic, since 2020"], ["Ireland"]]
    answers = [one.new_answers, two.new_answers]
    assert multi_hop_accuracy(predictions, answers) == 0.5
    assert multi_hop_accuracy([["Japan."]], [two.new_answers]) == 1.0
    with pytest.raises(ValueError, match="one entry per case"):
        multi_hop_accuracy(predictions, answers[:1])


def test_wikibigedit(tmp_path):
    first, second = load_requests(write(tmp_path, WIKIBIGEDIT))
    assert (first.text, first.target_new) == (
        "What position does Kirsty Coventry hold?",
        " President of the International Olympic Committee",
    )
    assert first.rephrase == ("Which office is held by Kirsty Coventry?",)
    assert [p.answer for p in first.portability] == [first.target_new, " Lausanne"]
    assert first.extra["portability_kinds"] == ["personas", "mhop"]
    assert pairs(first.locality) == [
        ("nq question: who sang the original version of hallelujah", " Leonard Cohen")
    ]
    assert first.extra["tag"] == "update"
    assert second.extra["portability_kinds"] == ["personas"]  # mhop is null


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (MEND_ZSRE, "zsre"),
        ([KNOWEDIT_ZSRE], "knowedit"),
        (FLAT_COUNTERFACT, "counterfact-easyedit"),
        (WIKIBIO, "wikibio"),
        (CONVSENT, "convsent"),
        (SANITATION_TEST, "sanitation"),
        (SANITATION_TRAIN, "sanitation"),
        (MQUAKE, "mquake"),
        (WIKIBIGEDIT, "wikibigedit"),
    ],
)
def test_each_format_is_detected_from_its_content(data, name):
    assert detect_format(data) == name
    assert name in FORMATS


@pytest.mark.parametrize(
    ("data", "change", "field"),
    [
        (MEND_ZSRE, lambda r: r.pop("alt"), "alt: missing"),
        (MEND_ZSRE, lambda r: r.update(answers=[]), "answers"),
        (MEND_ZSRE, lambda r: r["portability"].pop("New Answer"), "portability"),
        (
            FLAT_COUNTERFACT + FLAT_COUNTERFACT,
            lambda r: r.pop("locality_ground_truth"),
            "locality_",
        ),
        (WIKIBIO + WIKIBIO, lambda r: r.update(concept="someone else"), "subject"),
        (CONVSENT, lambda r: r.update(pos=["fine", 3], neg=["bad", 3]), r"(pos|neg)\[1\]"),
        (MQUAKE, lambda r: r["requested_rewrite"][1].pop("subject"), r"requested_rewrite\[1\]"),
        (MQUAKE, lambda r: r.update(questions=[]), "questions"),
        (WIKIBIGEDIT, lambda r: r.update(mhop="A question?"), "mhop_ans: missing"),
        (WIKIBIGEDIT, lambda r: r.pop("update"), "update: missing"),
    ],
)
def test_malformed_record_names_file_record_and_field(tmp_path, data, change, field):
    records = json.loads(json.dumps(data))  # unshared copies of repeated records
    change(records[1])
    path = write(tmp_path, records, "bench.json")
    with pytest.raises(ValueError, match=rf"bench\.json: record 1: .*{field}"):
        load_requests(path)
    loaded = load_requests(path, skip_bad=True)
    assert len(loaded.skipped) == 1 and "record 1" in loaded.skipped[0]


def test_skip_bad_counts_and_n_counts_good_records(tmp_path, caplog):
    records = json.loads(json.dumps(MEND_ZSRE * 3))
    records[0].pop("src")
    records[3]["loc_ans"] = ""
    path = write(tmp_path, records, "zsre.json")
    with caplog.at_level(logging.WARNING, logger="kedit.data"):
        loaded = load_requests(path, skip_bad=True)
    assert len(loaded) == 4 and len(loaded.skipped) == 2
    assert (loaded.format, loaded.source) == ("zsre", str(path))
    assert "skipped 2 malformed record(s)" in caplog.text
    limited = load_requests(path, n=2, skip_bad=True)
    assert [r.subject for r in limited] == ["Ramalinaceae", "Watts Humphrey"]
    assert len(limited.skipped) == 1


def test_sanitation_skips_bad_questions_to_keep(tmp_path):
    data = copy.deepcopy(SANITATION_TEST)
    data["locality"][1].pop("ground_truth")
    with pytest.raises(ValueError, match=r"locality record 1: ground_truth: missing"):
        sanitation_requests(data, source="trivia.json")
    loaded = sanitation_requests(data, source="trivia.json", skip_bad=True)
    assert len(loaded.skipped) == 1
    assert [p.answer for p in loaded[0].locality] == [" Mars"]
    with pytest.raises(ValueError, match="expected an object with 'K_F' and 'K_R'"):
        sanitation_requests({"forget": []}, source="trivia.json")


def test_load_requests_errors(tmp_path, monkeypatch):
    path = write(tmp_path, MEND_ZSRE)
    with pytest.raises(ValueError, match="format: unknown format 'zsre-mend'.*'wikibigedit'"):
        load_requests(path, format="zsre-mend")
    with pytest.raises(ValueError, match="seed: not an option of format 'zsre'; its options: none"):
        load_requests(path, seed=3)
    with pytest.raises(ValueError, match="split: only for Hugging Face hub datasets"):
        load_requests(path, split="test")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        load_requests("zjunlp/KnowEdit", format="knowedit")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_requests("data/missing.json")
