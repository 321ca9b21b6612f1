"""Adaptor, memory and context edits: what they change, their undo, their files, their stack."""

import re

import pytest
import torch

import kedit
from kedit.edits import (
    Adaptor,
    AdaptorDelta,
    ContextDelta,
    Edit,
    MemoryDelta,
    UndoOrderError,
    WeightDelta,
    attached,
    in_context,
    register_adaptor,
)
from kedit.eval.protocols import score_teacher_forced
from kedit.requests import EditRequest

HOST = "transformer.h.1.mlp.c_proj"


@register_adaptor
class _Shift(Adaptor):
    """Test double: adds `x @ weight` to its host's output."""

    kind = "test-shift"

    def adapt(self, inputs, output):
        return output + inputs @ self.weight


@register_adaptor
class _Rows(Adaptor):
    """Test double memory: adds the sum of its rows `shift [n, width]` to its host's output."""

    kind = "test-rows"

    def adapt(self, inputs, output):
        return output + self.shift.sum(0)


def _state(lm):
    return {name: value.clone() for name, value in lm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _request(subject="Ann"):
    return EditRequest(prompt="{} lives in", subject=subject, target_new=" Oslo")


def _edit(lm, *deltas, subject="Ann"):
    return Edit(lm, "handmade", {}, [_request(subject)], list(deltas))


def _shift(lm, seed=0):
    host = lm.model.get_submodule(HOST)
    width_in, width_out = host.weight.shape  # GPT-2's Conv1D stores (in, out)
    weight = torch.randn(width_in, width_out, generator=torch.Generator().manual_seed(seed))
    return AdaptorDelta(HOST, "test-shift", {"note": "test"}, {"weight": 1e-2 * weight})


def _rows(lm, rows_before, count, seed=0):
    width = lm.model.get_submodule(HOST).weight.shape[1]
    shift = torch.randn(count, width, generator=torch.Generator().manual_seed(seed))
    return MemoryDelta(HOST, "test-rows", {}, {"shift": rows_before}, {"shift": 1e-2 * shift})


def test_an_adaptor_adds_its_output_and_leaves_no_trace_when_undone(random_gpt2, tmp_path):
    lm = random_gpt2
    host = lm.model.get_submodule(HOST)
    inputs = torch.randn(2, 3, host.weight.shape[0])
    before, plain = _state(lm), host(inputs)
    delta = _shift(lm)
    edit = _edit(lm, delta).apply()
    torch.testing.assert_close(host(inputs), plain + inputs @ delta.tensors["weight"])
    assert set(_state(lm)) - set(before) == {f"{HOST}.kedit_0.weight"}
    path = edit.save(tmp_path / "shift.kedit")
    edit.undo()
    assert _same(before, _state(lm)) and not attached(host) and not host._forward_hooks
    assert torch.equal(host(inputs), plain)
    again = kedit.apply(lm, path)
    assert isinstance(again.deltas[0], AdaptorDelta) and again.deltas[0].config == {"note": "test"}
    torch.testing.assert_close(host(inputs), plain + inputs @ delta.tensors["weight"])
    again.undo()
    assert _same(before, _state(lm))


def test_two_adaptors_of_one_module_act_in_turn_and_undo_in_stack_order(random_gpt2):
    lm = random_gpt2
    host = lm.model.get_submodule(HOST)
    inputs = torch.randn(4, host.weight.shape[0])
    plain, before = host(inputs), _state(lm)
    first, second = _shift(lm, seed=1), _shift(lm, seed=2)
    a, b = _edit(lm, first).apply(), _edit(lm, second, subject="Bob").apply()
    expected = plain + inputs @ first.tensors["weight"] + inputs @ second.tensors["weight"]
    torch.testing.assert_close(host(inputs), expected)
    message = f"#2 handmade edit of 'Bob' -> ' Oslo' ({HOST})"
    with pytest.raises(UndoOrderError, match=re.escape(message)):
        a.undo()
    a.undo(cascade=True)
    assert not b.applied and _same(before, _state(lm)) and not attached(host)


def test_a_weight_edit_of_an_adapted_module_finds_its_parameter_and_stacks_on_it(random_gpt2):
    lm = random_gpt2
    before = _state(lm)
    adaptor = _edit(lm, _shift(lm)).apply()
    weight = f"{HOST}.weight"
    delta = WeightDelta.from_dense(weight, torch.full(lm.model.get_parameter(weight).shape, 1e-3))
    on_top = _edit(lm, delta, subject="Bob").apply()
    with pytest.raises(UndoOrderError, match=re.escape(f"({weight})")):
        adaptor.undo()
    on_top.undo()
    adaptor.undo()
    assert _same(before, _state(lm))


def test_a_memory_grows_edit_by_edit_and_shrinks_back(random_gpt2, tmp_path):
    lm = random_gpt2
    host = lm.model.get_submodule(HOST)
    inputs = torch.randn(3, host.weight.shape[0])
    plain, before = host(inputs), _state(lm)
    first, second = _rows(lm, 0, 2, seed=1), _rows(lm, 2, 1, seed=2)
    a = _edit(lm, first).apply()
    b = _edit(lm, second, subject="Bob").apply()
    (memory,) = attached(host)
    both = torch.cat([first.appended["shift"], second.appended["shift"]])
    assert torch.equal(memory.shift, both)
    torch.testing.assert_close(host(inputs), plain + both.sum(0))
    paths = [a.save(tmp_path / "a.kedit"), b.save(tmp_path / "b.kedit")]
    grown = _state(lm)
    with pytest.raises(UndoOrderError):
        a.undo()
    b.undo()
    assert torch.equal(memory.shift, first.appended["shift"])
    a.undo()
    assert _same(before, _state(lm)) and not attached(host) and not host._forward_hooks

    with pytest.raises(ValueError, match=r"builds on a test-rows memory with rows \{'shift': 2\}"):
        kedit.apply(lm, paths[1])
    assert _same(before, _state(lm)) and not attached(host)
    again = [kedit.apply(lm, path) for path in paths]
    assert _same(grown, _state(lm))
    for edit in reversed(again):
        edit.undo()
    assert _same(before, _state(lm))


def test_memory_rows_overwritten_come_back_on_undo(random_gpt2):
    lm = random_gpt2
    created = _edit(lm, _rows(lm, 0, 3, seed=1)).apply()
    (memory,) = attached(lm.model.get_submodule(HOST))
    grown = memory.shift.clone()
    new_rows = torch.ones(2, grown.shape[1])
    change = MemoryDelta(
        HOST, "test-rows", {}, {"shift": 3}, changed={"shift": (torch.tensor([0, 2]), new_rows)}
    )
    overwrite = _edit(lm, change, subject="Bob").apply()
    assert torch.equal(memory.shift[[0, 2]], new_rows) and torch.equal(memory.shift[1], grown[1])
    overwrite.undo()
    assert torch.equal(memory.shift, grown)
    created.undo()


def test_a_failed_or_non_finite_change_leaves_the_model_as_it_was(random_gpt2):
    lm = random_gpt2
    before = _state(lm)
    bad_rows = MemoryDelta(
        HOST, "test-rows", {}, {"shift": 0}, {"shift": torch.tensor([[float("nan")] * 2])}
    )
    with pytest.raises(FloatingPointError, match=f"non-finite update for {HOST}"):
        _edit(lm, _shift(lm), bad_rows).apply()
    # The first change is written, the second refused: the first must be taken back.
    misfit = _rows(lm, 5, 1)
    with pytest.raises(ValueError, match="none is attached"):
        _edit(lm, _shift(lm), misfit).apply()
    other_config = MemoryDelta(
        HOST, "test-rows", {"size": 3}, {"shift": 2}, _rows(lm, 2, 1).appended
    )
    with pytest.raises(ValueError, match="the attached test-rows memory has config"):
        _edit(lm, _rows(lm, 0, 2), other_config).apply()
    with pytest.raises(ValueError, match="unknown adaptor kind 'nope'"):
        _edit(lm, AdaptorDelta(HOST, "nope", {}, {"w": torch.zeros(1)})).apply()
    assert _same(before, _state(lm)) and not attached(lm.model.get_submodule(HOST))


def test_a_context_edit_is_read_by_the_protocols_and_undone(random_gpt2, tmp_path):
    lm = random_gpt2
    prefix = "Tomas Berg lives in Oslo. "
    pairs = [("Mira Olsen lives in", " Lisbon"), ("Ana Costa works as a", " teacher")]
    bare = score_teacher_forced(lm, pairs)
    with_prefix = score_teacher_forced(lm, [(prefix + p, a) for p, a in pairs])
    assert bare != with_prefix
    before = _state(lm)
    edit = _edit(lm, ContextDelta("prefix", {"text": prefix})).apply()
    assert in_context(lm.model, "Mira Olsen lives in") == prefix + "Mira Olsen lives in"
    assert score_teacher_forced(lm, pairs) == with_prefix
    path = edit.save(tmp_path / "context.kedit")
    edit.undo()
    assert score_teacher_forced(lm, pairs) == bare and _same(before, _state(lm))
    again = kedit.apply(lm, path)
    assert score_teacher_forced(lm, pairs) == with_prefix
    again.undo()
    assert in_context(lm.model, "x") == "x"


def test_evaluate_scores_a_context_edit_with_its_context_and_without(random_gpt2):
    lm = random_gpt2
    request = EditRequest(prompt="{} lives in", subject="Mira Olsen", target_new=" Lisbon")
    prefix = "Mira Olsen lives in Lisbon. "
    edit = _edit(lm, ContextDelta("prefix", {"text": prefix}))
    result = kedit.evaluate(lm, request, edit=edit, contexts=0)
    (expected,) = score_teacher_forced(lm, [(prefix + request.text, " Lisbon")])
    (unedited,) = score_teacher_forced(lm, [(request.text, " Lisbon")])
    assert result["post"]["teacher_forced"]["reliability"] == expected.accuracy
    assert result["pre"]["teacher_forced"]["reliability"] == unedited.accuracy
    assert not edit.applied


def test_greedy_replies_and_reply_likelihoods_read_a_context_edit(random_gpt2):
    # SafeEdit's DS/DG and PersonalityEdit's ES/Acc score replies: an IKE edit must be in them.
    from kedit.eval.chat import replies
    from kedit.eval.personality import PersonalityRun
    from kedit.eval.protocols import prompt_ids

    lm, prefix, prompt = random_gpt2, "Tomas Berg lives in Oslo. ", "Mira Olsen lives in"
    texts = ["a quiet city", "the north"]
    run = PersonalityRun.__new__(PersonalityRun)
    run.lm = lm
    with_prefix = (replies(lm, [prefix + prompt], 6, None), run.reply_logp(prefix + prompt, texts))
    bare = run.reply_logp(prompt, texts)
    with _edit(lm, ContextDelta("prefix", {"text": prefix})).apply():
        assert prompt_ids(lm, prompt) == lm.encode_prompt(prefix + prompt)
        assert replies(lm, [prompt], 6, None) == with_prefix[0]
        read = run.reply_logp(prompt, texts)
    assert all(torch.equal(a, b) for a, b in zip(read, with_prefix[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(read, bare, strict=True))


def test_edit_kinds_check_what_they_are_given():
    with pytest.raises(ValueError, match="it changes nothing"):
        MemoryDelta(HOST, "test-rows", {}, {"shift": 0})
    with pytest.raises(ValueError, match=r"rows_before lacks \['shift'\]"):
        MemoryDelta(HOST, "test-rows", {}, {}, {"shift": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="an adaptor needs tensors"):
        AdaptorDelta(HOST, "test-shift", {}, {})
    with pytest.raises(ValueError, match="config: expected JSON values only"):
        ContextDelta("prefix", {"text": object()})
