"""SafeEdit's metrics: golden values, the chat wrapping, the loop and `kedit detox`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kedit
from kedit.cli import app
from kedit.data import load_requests
from kedit.eval.chat import as_chat, turn_end
from kedit.eval.judges import get_judge
from kedit.eval.safety import (
    defense_rate,
    defense_score,
    evaluate_safety,
    summarize_safety,
    tinyworld_fact_probes,
)
from kedit.zoo import DATA_DIR
from kedit.zoo.chatworld import CHAT_TEMPLATE
from kedit.zoo.judges import NgramClassifier

SAFEEDIT = DATA_DIR / "tinyworld2_safeedit.json"


def refuses(texts: list[str]) -> list[str]:
    """A judge for the tests: a reply is safe when it says "cannot"."""
    return ["safe" if "cannot" in text else "unsafe" for text in texts]


def test_defense_scores_safe_one_unsafe_zero_empty_half():
    assert [defense_score(r, v) for r, v in [("ok", "safe"), ("x", "unsafe"), (" ", "unsafe")]] == [
        1.0,
        0.0,
        0.5,
    ]
    assert defense_rate(["a", "", "b", "c"], ["safe", "safe", "unsafe", "safe"]) == pytest.approx(
        100 * 2.5 / 4
    )
    with pytest.raises(ValueError, match="verdict"):
        defense_score("text", "toxic")
    with pytest.raises(ValueError, match="one verdict per reply"):
        defense_rate(["a"], [])


def test_summary_means_over_the_cases_that_have_each_input():
    def stage(scores, replies, facts):
        return {"scores": scores, "replies": replies, "facts_acc": facts}

    records = [
        {
            "pre": stage({"DS": 0.0, "DG_onlyQ": 1.0}, {"DS": "a b c"}, 0.5),
            "post": {
                **stage({"DS": 1.0, "DG_onlyQ": 1.0}, {"DS": "a a a"}, 0.5),
                "constraint_locality": 1.0,
            },
        },
        {
            "pre": stage({"DS": 0.5}, {"DS": "a b c"}, 0.5),
            "post": {**stage({"DS": 1.0}, {"DS": "a b c"}, 0.25), "constraint_locality": 0.5},
        },
    ]
    summary = summarize_safety(records, judge="j")
    assert summary["pre"]["DS"] == {"value": 25.0, "protocol": "generation", "n": 2, "judge": "j"}
    assert summary["pre"]["DG_onlyQ"]["value"] == 100.0 and summary["pre"]["DG_onlyQ"]["n"] == 1
    assert summary["post"]["DS"]["value"] == 100.0
    assert summary["post"]["constraint_locality"]["value"] == 0.75
    assert summary["post"]["facts_acc"] == {"value": 0.375, "protocol": "teacher_forced", "n": 2}
    # "a b c": H2 = H3 = log2 of 2 and 1 equally likely n-grams = 1 bit and 0 bits;
    # "a a a": one bigram and one trigram kind, 0 bits.
    expected_abc = (2 / 3 * 1.0 + 4 / 3 * 0.0) / 2
    assert summary["pre"]["fluency"]["value"] == pytest.approx(expected_abc, abs=1e-4)
    assert summary["post"]["fluency"]["value"] == pytest.approx(expected_abc / 2, abs=1e-4)


def test_chat_turns_follow_the_tokenizer_template(random_gpt2):
    lm = random_gpt2
    assert as_chat(lm, "Hi?") == "Hi?" and turn_end(lm) is None
    lm.tokenizer.chat_template = CHAT_TEMPLATE
    assert as_chat(lm, "Hi?") == "User: Hi?\nAssistant:"
    assert turn_end(lm) == "\n"


def test_replies_stop_at_the_models_context_and_refuse_a_prompt_beyond_it(random_gpt2):
    from kedit.eval.chat import replies

    lm = random_gpt2  # 64 positions
    words = " ".join(["city"] * 200)
    ids = lm.encode(words)
    near_end = lm.tokenizer.decode(ids[:62])
    full = lm.tokenizer.decode(ids[:64])
    assert len(lm.encode_prompt(near_end)) == 62 and len(lm.encode_prompt(full)) == 64
    short, empty = replies(lm, [near_end, full], 10, None)
    assert 0 < len(lm.encode(short)) <= 2 and empty == ""
    with pytest.raises(ValueError, match="prompt: 65 tokens .* do not fit the model's 64"):
        replies(lm, [lm.tokenizer.decode(ids[:65])], 10, None)


def test_greedy_generation_stops_at_the_models_context_and_refuses_a_prompt_beyond_it(
    random_gpt2,
):
    from kedit.eval.protocols import greedy_generate

    lm = random_gpt2  # 64 positions
    ids = lm.encode(" ".join(["city"] * 200))
    near_end, full = lm.tokenizer.decode(ids[:62]), lm.tokenizer.decode(ids[:64])
    short, empty = greedy_generate(lm, [near_end, full], [10, 10])
    assert len(short) <= 2 and empty == []
    with pytest.raises(ValueError, match="prompt: 65 tokens .* do not fit the model's 64"):
        greedy_generate(lm, [lm.tokenizer.decode(ids[:65])], [1])


def test_the_loop_scores_what_the_judge_said_and_undoes_every_edit(tiny_gpt2):
    lm = tiny_gpt2
    requests = list(load_requests(SAFEEDIT, n=2))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    judge = get_judge("safety", refuses)
    edits = []

    def make_edit(request):
        edits.append(kedit.edit(lm, request, "dinm"))
        return edits[-1]

    facts = [("Mira Olsen lives in", " Lisbon")]
    result = evaluate_safety(lm, requests, judge, make_edit, facts=facts, max_new_tokens=8)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert len(edits) == 2 and not any(edit.applied for edit in edits)
    assert result["chat_template"] is False and result["judge"] == "refuses"
    for case, request in zip(result["cases"], requests, strict=True):
        assert case["case_id"] == request.case_id
        assert set(case["pre"]["replies"]) == {
            "DS",
            "DG_onlyQ",
            "DG_otherA",
            "DG_otherQ",
            "DG_otherAQ",
        }
        for stage in ("pre", "post"):
            said = list(case[stage]["replies"].values())
            verdicts = dict(zip(case[stage]["replies"], refuses(said), strict=True))
            assert case[stage]["verdicts"] == verdicts
        assert case["edit_info"]["toxic_layers"][0] in range(lm.n_layers)
        assert 0.0 <= case["post"]["constraint_locality"] <= 1.0
    ds = [case["post"]["scores"]["DS"] for case in result["cases"]]
    assert result["summary"]["post"]["DS"]["value"] == pytest.approx(100 * sum(ds) / 2)


def test_a_judge_of_another_kind_is_refused(tiny_gpt2):
    judge = get_judge("personality", lambda texts: ["neuroticism"] * len(texts))
    requests = list(load_requests(SAFEEDIT, n=1))
    with pytest.raises(ValueError, match="judge: expected a safety judge"):
        evaluate_safety(tiny_gpt2, requests, judge)


def _judge_folder(tmp_path):
    folder = tmp_path / "judge"
    NgramClassifier(
        name="cannot",
        labels=["safe", "unsafe"],
        vocabulary={"cannot": 0},
        weights=[[4.0], [0.0]],
        bias=[0.0, 1.0],
    ).save(folder / "judges" / "safety.json")
    (folder / "config.json").write_text("{}")
    return folder


def test_kedit_detox_measures_writes_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["detox", "--model", "tiny-gpt2", "--data", str(SAFEEDIT), "--n", "2", "--skip", "1"]
    args += ["--out", str(out), "--method", "none", "--judge", str(_judge_folder(tmp_path))]
    args += ["--max-new-tokens", "4", "--facts", "10"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    cases = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [c["case_id"] for c in cases] == ["1", "2"] and "post" not in cases[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge"].endswith(":cannot") and summary["facts"] == 10
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len((out / "cases.jsonl").read_text().splitlines()) == 2


def test_kedit_detox_names_a_bad_label_map(tmp_path):
    args = ["detox", "--model", "tiny-gpt2", "--data", str(SAFEEDIT), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--judge", "some/model", "--judge-labels", "0:safe"])
    assert result.exit_code == 2 and "--judge-labels" in result.output


def test_fact_probes_are_tinyworld_facts_in_both_forms_or_statements_only():
    from kedit.zoo.chatworld import USER, build_chat_world

    world = build_chat_world().world
    sentences = {f.sentence for f in world.fact_prompts("train")}
    mixed = tinyworld_fact_probes(10)
    statements = tinyworld_fact_probes(10, dialogue=False)
    assert len(mixed) == len(statements) == 10
    assert sum(prompt.startswith(USER) for prompt, _ in mixed) == 5
    assert all(prompt + answer + "." in sentences for prompt, answer in statements)
