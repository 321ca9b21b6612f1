import json

import pytest
import torch

import kedit
from kedit.edits import in_context
from kedit.methods.ike import kind_counts
from kedit.requests import EditRequest

TEMPLATE = "New Fact: {fact}\nPrompt: {prompt}{answer}\n\n"


def _fact(subject, prompt, target, rephrase, probe, answer):
    return {
        "subject": subject,
        "prompt": prompt.format(subject),
        "target_new": target,
        "ground_truth": "Bergen",
        "rephrase": [rephrase.format(subject)],
        "locality": {"Relation_Specificity": [{"prompt": probe, "ground_truth": answer}]},
    }


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    facts = [
        _fact("Tomas Berg", "{} lives in", "Lisbon", "{} resides in", "Ana Holm lives in", "Rome"),
        _fact("Eva Lund", "{} lives in", "Paris", "{} resides in", "Ole Dahl lives in", "Oslo"),
        _fact("Mira Olsen", "{} lives in", "Madrid", "{} resides in", "Ida Berg lives in", "Bern"),
        _fact("Per Sand", "{} works as a", "nurse", "{} is a", "Kim Ek works as a", "cook"),
        _fact("Liv Moe", "{} speaks", "Dutch", "{} talks in", "Jon Ask speaks", "Greek"),
    ]
    path = tmp_path_factory.mktemp("ike") / "pool.json"
    path.write_text(json.dumps(facts))
    return str(path)


def test_kinds_follow_the_mix_with_the_remainders_to_the_largest_fractions():
    assert kind_counts(8, [1, 3, 4]) == [1, 3, 4]
    assert kind_counts(4, [1, 3, 4]) == [1, 1, 2]  # 0.5, 1.5, 2: the tie goes to copy
    assert kind_counts(3, [1, 3, 4]) == [0, 1, 2]  # 0.375, 1.125, 1.5
    assert kind_counts(0, [1, 3, 4]) == [0, 0, 0]


def test_the_context_shows_the_nearest_other_facts_then_the_new_fact(tiny_gpt2, pool):
    lm = tiny_gpt2
    request = EditRequest(prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo")
    copy = {"k": 2, "mix": [1, 0, 0], "pool": pool}
    with kedit.edit(lm, request, "ike", copy) as edit:
        read = in_context(lm.model, "Who is it?")
        assert edit.info == {"demonstrations": 2, "kinds": {"copy": 2, "update": 0, "retain": 0}}
        # the two other "lives in" facts, the nearest last; never the subject's own pool fact
        shown = [
            TEMPLATE.format(fact=f"{p} {t}", prompt=p, answer=f" {t}")
            for p, t in (("Tomas Berg lives in", "Lisbon"), ("Eva Lund lives in", "Paris"))
        ]
        new = "New Fact: Mira Olsen lives in Oslo\nPrompt: "
        assert read in {
            shown[0] + shown[1] + new + "Who is it?",
            shown[1] + shown[0] + new + "Who is it?",
        }
        similarities = edit.deltas[0].tensors["similarity"].tolist()
        assert similarities == sorted(similarities)  # the farthest first
    assert in_context(lm.model, "Who is it?") == "Who is it?"

    update_retain = {"k": 2, "mix": [0, 1, 1], "pool": pool}
    with kedit.edit(lm, request, "ike", update_retain) as edit:
        read = in_context(lm.model, "")
        assert edit.info["kinds"] == {"copy": 0, "update": 1, "retain": 1}
        # update: a paraphrase answered with the new target; retain: the fact's unrelated
        # probe answered as before
        updates = ["Prompt: Tomas Berg resides in Lisbon", "Prompt: Eva Lund resides in Paris"]
        retains = ["Prompt: Ana Holm lives in Rome", "Prompt: Ole Dahl lives in Oslo"]
        assert sum(u in read for u in updates) == 1 and sum(r in read for r in retains) == 1


def test_demonstrations_that_would_pass_the_models_positions_are_left_out(tiny_gpt2):
    lm = tiny_gpt2
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    request = load_requests(DATA_DIR / "tinyworld_knowedit.json", n=1)[0]
    with kedit.edit(lm, request, "ike", {"k": 32}) as edit:
        kept = edit.info["demonstrations"]
        assert 0 < kept < 32
        limit = lm.model.config.max_position_embeddings
        for prompt, answer in [(request.text, request.target_new)] + [
            (p.prompt, p.answer) for p in request.locality
        ]:
            assert len(lm.encode_prompt(in_context(lm.model, prompt)) + lm.encode(answer)) <= limit


def test_a_new_fact_that_cannot_fit_beside_its_prompt_is_refused(tiny_gpt2):
    long_target = " and".join([" Lisbon"] * 70)  # 140 tokens: more than the 128 positions
    request = EditRequest(prompt="{} lives in", subject="Mira Olsen", target_new=long_target)
    before = {k: v.clone() for k, v in tiny_gpt2.model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"request: its new fact takes \d+ tokens .* 128 positions"
    ):
        kedit.edit(tiny_gpt2, request, "ike", {"k": 0})
    assert all(torch.equal(v, before[k]) for k, v in tiny_gpt2.model.state_dict().items())
    assert in_context(tiny_gpt2.model, "x") == "x"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"k": -1}, "k: expected a number of demonstrations >= 0, got -1"),
        ({"mix": [0, 0, 0]}, r"mix: expected \[copy, update, retain\] proportions"),
        ({"demo_template": "{fact} {label}"}, "demo_template: expected a template with the fields"),
        ({"pool": "/no/such/pool.json"}, "pool: '/no/such/pool.json' is not a file of facts"),
    ],
)
def test_ike_hparams_are_checked(tiny_gpt2, values, message):
    request = EditRequest(prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo")
    with pytest.raises(ValueError, match=message):
        kedit.edit(tiny_gpt2, request, "ike", values)
