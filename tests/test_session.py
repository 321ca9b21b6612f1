import pytest
import torch

import kedit
from kedit.edits import UndoOrderError
from kedit.methods.alphaedit import AlphaEditState


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n)


def test_sequential_edits_then_undo_restore_the_model_bit_exactly(tiny_gpt2):
    lm = tiny_gpt2
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    session = kedit.Session(lm, "alphaedit", {"v_steps": 5})
    assert isinstance(session.state, AlphaEditState)
    requests = _requests(6)
    grown = []
    for start in range(0, 6, 2):
        edit = session.edit(requests[start : start + 2])
        assert edit.applied and edit.info["earlier_keys"] == start
        grown.append(session.state.n_keys)
    assert grown == [2, 4, 6]
    assert len(session) == 3 and session.edits[-1] is edit
    assert not torch.equal(
        before[edit.deltas[0].param], lm.model.state_dict()[edit.deltas[0].param]
    )

    session.reset_state()
    assert session.state.n_keys == 0 and len(session) == 3
    session.edit(requests[:1], batch_size=1)
    assert session.state.n_keys == 1

    session.undo()
    assert len(session) == 0 and session.state.n_keys == 0
    after = lm.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_session_undo_skips_edits_undone_on_their_own_and_keeps_the_stack_order(tiny_gpt2):
    lm = tiny_gpt2
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    session = kedit.Session(lm, "r-rome", {"v_steps": 5})
    assert session.state is None
    edits = [session.edit(request) for request in _requests(3)]
    with pytest.raises(UndoOrderError, match="'Sofia Delric'.*#3 r-rome edit of 'Mira Brixmann'"):
        edits[1].undo()
    assert all(edit.applied for edit in edits)
    edits[2].undo()
    session.reset_state()
    session.undo()
    assert len(session) == 0 and not any(edit.applied for edit in edits)
    after = lm.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_session_undo_refuses_while_a_later_edit_outside_it_changes_its_parameters(tiny_gpt2):
    lm = tiny_gpt2
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    requests = _requests(2)
    session = kedit.Session(lm, "rome", {"v_steps": 5})
    mine = session.edit(requests[0])
    outside = kedit.edit(lm, requests[1], "rome", {"v_steps": 5})
    with pytest.raises(UndoOrderError, match="#2 rome edit of 'Sofia Delric'"):
        session.undo()
    assert mine.applied and outside.applied and len(session) == 1
    outside.undo()
    session.undo()
    after = lm.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_session_checks_its_inputs(tiny_gpt2):
    with pytest.raises(TypeError, match="lm: expected a kedit.LM"):
        kedit.Session("tiny-gpt2", "alphaedit")
    with pytest.raises(ValueError, match="method: unknown method 'alpha'"):
        kedit.Session(tiny_gpt2, "alpha")
    with pytest.raises(ValueError, match="unknown hyper-parameter 'ridg'"):
        kedit.Session(tiny_gpt2, "alphaedit", {"ridg": 1})
    session = kedit.Session(tiny_gpt2, "rome")
    with pytest.raises(ValueError, match="batch_size: method 'rome' edits one request at a time"):
        session.edit(_requests(2), batch_size=2)
    assert len(session) == 0
