import sys
from pathlib import Path

import pytest
import torch

import kedit
from kedit.edits import attached
from kedit.hooks import capture
from kedit.methods._train import request_row
from kedit.methods.wise import (
    SideMemory,
    WISEHyperParams,
    held_subjects,
    margin_loss,
    memory_rows,
    near_miss_texts,
    one_token_away,
    other_shards_rows,
    segment_maxima,
    shard_mask,
    shard_rows,
    ties_merge,
)

PATH = "transformer.h.5.mlp.c_proj"
PARAMS = {"layers": [5], "lr": 5.0, "act_margin": [20.0, 80.0, 40.0], "act_ratio": 0.88}


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n)


def test_ties_keeps_the_largest_entries_elects_signs_and_averages_those_that_agree():
    vectors = torch.tensor(
        [
            [3.0, -2.0, 0.5, 1.0],
            [0.5, 4.0, -0.2, -1.0],
            [-2.0, 1.5, 0.1, 3.0],
        ]
    )
    # density 0.5 keeps two entries each: [3, -2, 0, 0], [0, 4, 0, -1], [-2, 0, 0, 3]
    # column sums 1, 2, 0, 2 -> signs +, +, 0, +; agreeing kept entries: [3], [4], none, [3]
    expected = torch.tensor([3.0, 4.0, 0.0, 3.0])
    assert torch.equal(ties_merge(vectors, 0.5), expected)


def test_a_token_reads_the_shard_with_the_largest_score_if_it_passes_its_threshold():
    memory = SideMemory({})
    memory.set_buffer("deltas", torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]))
    memory.set_buffer("thresholds", torch.tensor([1.5, 3.0]))
    memory.set_buffer("counts", torch.tensor([1, 1]))
    inputs = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    output = torch.zeros(4, 2)
    # scores (shard 0, shard 1): (2, 0) -> shard 0 passes 1.5; (0, 2) -> shard 1 fails 3;
    # (0, 4) -> shard 1 passes; (1, 2) -> shard 1 has the larger score and fails its 3.
    expected = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    assert torch.equal(memory.adapt(inputs, output), expected)


def _scores(lm, memory, text_or_ids):
    ids = lm.encode_prompt(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    with torch.no_grad(), capture(lm.model, [PATH], "input") as seen:
        lm.model(input_ids=torch.tensor([ids]))
    return (seen[PATH][0].float() @ memory.deltas[0]).norm(dim=-1)


def test_an_edit_routes_its_prompt_to_the_side_memory_and_leaves_the_main_memory(tiny_gpt2):
    lm = tiny_gpt2
    request = _requests(1)[0]
    weight = lm.model.get_parameter(f"{PATH}.weight").detach().clone()
    with kedit.edit(lm, request, "wise", PARAMS) as edit:
        (memory,) = attached(lm.model.get_submodule(PATH))
        assert torch.equal(lm.model.get_parameter(f"{PATH}.weight"), weight)
        threshold = float(memory.thresholds[0])
        assert threshold == pytest.approx(0.88 * edit.info["edit_score"], rel=1e-5)
        assert float(_scores(lm, memory, request.text)[-1]) > threshold
        assert edit.info["irrelevant_score"] < threshold
        mask = shard_mask(memory.deltas[0].shape, 0.2, 0, 0)
        assert bool((memory.deltas[0][~mask] == 0).all()) and bool(memory.deltas[0][mask].any())
        assert bool((memory.deltas[0].abs() <= 1.0).all())  # the norm constraint


def test_shards_fill_up_and_merge_with_ties(tiny_gpt2):
    lm = tiny_gpt2
    first, second, third = _requests(3)
    params = {**PARAMS, "shard_size": 1, "merge_every": 3}
    with kedit.edit(lm, [first, second], "wise", params) as two:
        (memory,) = attached(lm.model.get_submodule(PATH))
        assert memory.counts.tolist() == [1, 1] and [i["shard"] for i in two.info["requests"]] == [
            0,
            1,
        ]
        masks = [shard_mask(memory.deltas[0].shape, 0.2, 0, s) for s in (0, 1)]
        assert not torch.equal(masks[0], masks[1])
        for shard, mask in enumerate(masks):
            assert bool((memory.deltas[shard][~mask] == 0).all())
        shards = memory.deltas.clone()
        with kedit.edit(lm, third, "wise", {**params, "merge_every": 0}):
            third_shard = memory.deltas[2].clone()  # what the third edit trains, unmerged
        with kedit.edit(lm, third, "wise", params) as merging:
            assert merging.info["merged_shards"] == 3
            assert memory.counts.tolist() == [3, 0, 0] and memory.thresholds[1:].tolist() == [0, 0]
            assert not memory.deltas[1:].any()
            expected = ties_merge(torch.stack([*shards, third_shard]), 0.53)
            assert torch.equal(memory.deltas[0], expected)
        assert torch.equal(memory.deltas, shards)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"layers": [4, 5]}, "layers: WISE's side memory sits at one layer"),
        ({"act_margin": [1.0, 2.0]}, r"act_margin: expected \[α, β, γ\] >= 0"),
        ({"mask_ratio": 0.0}, r"mask_ratio: expected a number in \(0, 1\], got 0.0"),
        ({"shard_size": 0}, "shard_size: expected a positive integer, got 0"),
        ({"negatives": -1}, "negatives: expected an integer >= 0, got -1"),
        ({"negatives": True}, "negatives: expected int, got True"),
        ({"near_misses": -2}, "near_misses: expected an integer >= 0, got -2"),
    ],
)
def test_wise_hparams_are_checked(tiny_gpt2, values, message):
    with pytest.raises(ValueError, match=message):
        kedit.edit(tiny_gpt2, _requests(1), "wise", values)


def test_replay_trains_the_shards_earlier_edits_again_and_its_threshold_covers_them(tiny_gpt2):
    lm = tiny_gpt2
    first, second = _requests(2)
    params = {"layers": [5], "shard_size": 5, "replay": True, "act_ratio": 0.88}
    with kedit.edit(lm, [first, second], "wise", params) as edit:
        (memory,) = attached(lm.model.get_submodule(PATH))
        assert [i["replayed"] for i in edit.info["requests"]] == [0, 1]
        assert shard_rows(memory_rows(memory), 0) == [
            request_row(lm, first),
            request_row(lm, second),
        ]
        scores = []
        for request in (first, second):
            ids, positions, _ = request_row(lm, request)
            scores.append(_scores(lm, memory, ids)[positions].min())
        assert float(memory.thresholds[0]) == pytest.approx(0.88 * float(min(scores)), rel=1e-4)
        for request in (first, second):
            ids, positions, targets = request_row(lm, request)
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([ids])).logits[0]
            assert logits[positions].argmax(-1).tolist() == targets


def test_an_edit_whose_target_is_already_predicted_trains_until_it_is_routed(tiny_gpt2):
    # A target NLL under stop_nll before any step (here: a stop_nll no NLL exceeds) leaves
    # only the routing to wait for; it is judged on the side memory as it is at that step.
    lm = tiny_gpt2
    request = _requests(1)[0]
    with kedit.edit(lm, request, "wise", {**PARAMS, "stop_nll": 1e6}) as edit:
        (memory,) = attached(lm.model.get_submodule(PATH))
        assert edit.info["steps"] >= 1  # a zero side memory routes nothing apart
        assert 0.88 * edit.info["edit_score"] > edit.info["irrelevant_score"]
        ids, positions, _ = request_row(lm, request)
        assert float(_scores(lm, memory, ids)[positions].min()) > float(memory.thresholds[0])


def _misrouted(lm, memory, requests, per_shard):
    """How many target tokens of the edits another shard than their own scores highest on."""
    wrong = 0
    for index, request in enumerate(requests):
        ids, positions, _ = request_row(lm, request)
        with torch.no_grad(), capture(lm.model, [PATH], "input") as seen:
            lm.model(input_ids=torch.tensor([ids]))
        inputs = seen[PATH][0].float()[positions]
        scores = torch.einsum("ti,sio->sto", inputs, memory.deltas).norm(dim=-1)
        best, shard = scores.max(0)
        wrong += sum(s != index // per_shard for s in shard.tolist())
        if bool((shard == index // per_shard).all()):
            assert bool((best > memory.thresholds[index // per_shard]).all())
    return wrong


def test_with_negatives_every_edit_is_retrieved_by_its_own_shard(tiny_gpt2):
    # Four facts of each of five people, two edits a shard: without negatives a later shard
    # takes some of an earlier edit of the same person (measured: 2 of 20 tokens).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tinyworld_cases import distinct_fact_cases

    lm = tiny_gpt2
    requests, _ = distinct_fact_cases(20, shuffle_seed=0, people=5)
    # (negatives alone: near misses, on in tiny-gpt2's defaults, leave 1 of the 20 misrouted)
    params = {"layers": [5], "shard_size": 2, "replay": True, "near_misses": 0}
    with kedit.edit(lm, requests, "wise", {**params, "negatives": 0}):
        (memory,) = attached(lm.model.get_submodule(PATH))
        assert _misrouted(lm, memory, requests, 2) > 0
    with kedit.edit(lm, requests, "wise", {**params, "negatives": 8}):
        (memory,) = attached(lm.model.get_submodule(PATH))
        assert memory.edits[:, 0].tolist() == [i // 2 for i in range(20)]
        assert _misrouted(lm, memory, requests, 2) == 0
        # the rows a later edit takes as negatives: other shards' edits only, each at most once,
        # the same at every call
        held = memory_rows(memory)
        rows = other_shards_rows(held, 9, 3, requests[19], seed=0)
        others = [row for shard in range(9) for row in shard_rows(held, shard)]
        assert len(rows) == 3 and all(row in others for row in rows)
        assert len({tuple(row[0]) for row in rows}) == 3
        assert rows == other_shards_rows(held, 9, 3, requests[19], seed=0)
        assert other_shards_rows(held, 9, 30, requests[19], seed=0) == others


def test_the_margin_loss_takes_each_irrelevant_texts_largest_score():
    values = torch.tensor([1.0, 5.0, 2.0, 7.0, 3.0, 3.0], requires_grad=True)
    maxima = segment_maxima(values, [3, 1, 2])
    assert maxima.tolist() == [5.0, 7.0, 3.0]
    # α, β, γ = 4, 10, 3 with the edit's smallest score 8: per text
    # relu(t - 4) + relu(10 - 8) + relu(3 - (8 - t)): t=5: 1 + 2 + 0; t=7: 3 + 2 + 2; t=3: 0 + 2 + 0
    loss = margin_loss(torch.tensor([9.0, 8.0]), maxima, [4.0, 10.0, 3.0])
    assert float(loss.detach()) == pytest.approx((3 + 7 + 2) / 3)
    loss.backward()
    # d/dt of each text's terms: t=5: 1 (the γ term is flat there); t=7: 1 + 1; t=3: 0
    assert values.grad.tolist() == pytest.approx([0.0, 1 / 3, 0.0, 2 / 3, 0.0, 0.0], abs=1e-6)


def test_one_token_away_swaps_each_token_for_a_same_length_subjects_token_at_its_position():
    assert one_token_away([1, 2, 3], [[1, 2, 3], [4, 2, 5], [6, 7], [8, 9, 3]]) == [
        [4, 2, 3],
        [1, 2, 5],
        [8, 2, 3],
        [1, 9, 3],
    ]
    assert one_token_away([1, 2], []) == []


def _tokens_apart(ids, other):
    """How many tokens two names of one length differ in (None for lengths that differ)."""
    if len(ids) != len(other):
        return None
    return sum(a != b for a, b in zip(ids, other, strict=True))


def _near_miss_probes(lm, requests):
    """Prompts of the edits about never-edited tinyworld people whose names are one token away
    from the edit's subject, and which no near miss drawn from the edited subjects can name."""
    from kedit.requests import fill_subject
    from kedit.zoo import build_world

    subjects = sorted({r.subject for r in requests})
    others = [name for name in build_world().people if name not in subjects]
    subject_ids = lm.encode_many(subjects)
    drawable = {lm.tokenizer.decode(v) for s in subject_ids for v in one_token_away(s, subject_ids)}
    probes = set()
    for request, mine in zip(requests, lm.encode_many([r.subject for r in requests]), strict=True):
        for name, ids in zip(others, lm.encode_many(others), strict=True):
            if _tokens_apart(ids, mine) == 1 and name not in drawable:
                probes.add(fill_subject(request.template, name))
    return sorted(probes)


def _routed(lm, memory, prompts):
    """How many prompts' last tokens the side memory takes (their best shard's score passes
    its threshold)."""
    routed = 0
    for prompt in prompts:
        with torch.no_grad(), capture(lm.model, [PATH], "input") as seen:
            lm.model(input_ids=torch.tensor([lm.encode_prompt(prompt)]))
        last = seen[PATH][0, -1].float()
        best, shard = torch.einsum("i,sio->so", last, memory.deltas).norm(dim=-1).max(0)
        routed += int(best > memory.thresholds[shard])
    return routed


def test_near_misses_keep_names_one_token_away_from_an_edited_subject_off_the_side_memory(
    tiny_gpt2,
):
    # Two facts of each of ten people. Prompts about people one token away from an edited subject
    # (which the near misses, drawn from the edited subjects' tokens, never name) read nearly the
    # edit's activation: measured, 9 of 60 routed without near misses, 1 with 8.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tinyworld_cases import distinct_fact_cases

    lm = tiny_gpt2
    requests, _ = distinct_fact_cases(20, shuffle_seed=0, people=10)
    probes = _near_miss_probes(lm, requests)
    assert len(probes) >= 30
    params = {"layers": [5], "shard_size": 5, "replay": True, "irrelevant": 32, "negatives": 64}
    with kedit.edit(lm, requests, "wise", {**params, "act_ratio": 0.95, "near_misses": 0}):
        (memory,) = attached(lm.model.get_submodule(PATH))
        without = _routed(lm, memory, probes)
    with kedit.edit(lm, requests, "wise", {**params, "act_ratio": 0.95, "near_misses": 8}) as edit:
        (memory,) = attached(lm.model.get_submodule(PATH))
        routed = _routed(lm, memory, probes)
        assert held_subjects(dict(memory.named_buffers())) == list(
            dict.fromkeys(r.subject for r in requests)
        )
        counts = [info["near_misses"] for info in edit.info["requests"]]
        assert counts[0] == 0 and max(counts) == 8  # none before the first edit, then up to 8
        # a near miss: the edit's template about a subject's one-token-away variant (decoded; it
        # may encode into other tokens), drawn from the subjects edited before
        last = requests[-1]
        before, after = last.template.split("{}")
        held = held_subjects(memory._buffers)
        variants = one_token_away(lm.encode(last.subject), lm.encode_many(held))
        names = {lm.tokenizer.decode(v) for v in variants} - {last.subject}
        texts = near_miss_texts(lm, WISEHyperParams.from_dict(edit.hparams), last, held)
        assert len(texts) == 8
        for text in texts:
            assert text.startswith(before) and text.endswith(after)
            assert text[len(before) : len(text) - len(after)] in names
    assert without >= 5
    assert routed * 3 <= without


def test_a_memory_made_before_it_kept_subjects_takes_further_edits(tiny_gpt2):
    # A side memory saved by an earlier kedit has no subject buffers: the next edit starts
    # them, and its undo leaves the memory as it found it.
    lm = tiny_gpt2
    first, second = _requests(2)
    params = {**PARAMS, "near_misses": 4}
    with kedit.edit(lm, first, "wise", params):
        (memory,) = attached(lm.model.get_submodule(PATH))
        assert held_subjects(memory._buffers) == [first.subject]
        memory.set_buffer("subject_bytes", None)
        memory.set_buffer("subject_sizes", None)
        before = {name: buffer.clone() for name, buffer in memory.named_buffers()}
        with kedit.edit(lm, second, "wise", params):
            assert held_subjects(memory._buffers) == [second.subject]
            assert len(memory.edits) == 2
        after = dict(memory.named_buffers())
        assert after.keys() == before.keys()
        assert all(torch.equal(after[name], before[name]) for name in before)
