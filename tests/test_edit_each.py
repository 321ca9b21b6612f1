import pytest
import torch

import kedit
from kedit.data import load_requests
from kedit.zoo import benchmark_path

QUICK = {"v_steps": 8}


def _requests(n):
    return load_requests(benchmark_path("knowedit"), n=n)


@pytest.mark.parametrize("method", ["rome", "r-rome", "ft-m"])
def test_each_edit_is_the_edit_of_that_request_alone(tiny_gpt2, method):
    requests = _requests(3)
    hparams = QUICK if method != "ft-m" else {"steps": 5}
    before = {name: value.clone() for name, value in tiny_gpt2.model.state_dict().items()}
    for request, each in zip(
        requests, kedit.edit_each(tiny_gpt2, requests, method, hparams, group=2), strict=True
    ):
        assert not each.applied and each.requests == [request]
        alone = kedit.edit(tiny_gpt2, request, method=method, hparams=hparams)
        alone.undo()
        assert [d.param for d in each.deltas] == [d.param for d in alone.deltas]
        for mine, theirs in zip(each.deltas, alone.deltas, strict=True):
            assert torch.allclose(mine.tensor(), theirs.tensor(), atol=1e-5, rtol=1e-3)
        each.apply()
        each.undo()
    after = tiny_gpt2.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_taking_the_next_edit_while_the_last_is_applied_is_refused(tiny_gpt2):
    edits = kedit.edit_each(tiny_gpt2, _requests(2), "rome", QUICK, group=1)
    first = next(edits)
    first.apply()
    try:
        with pytest.raises(RuntimeError, match="undo the last edit"):
            next(edits)
    finally:
        first.undo()


def test_edit_each_checks_its_inputs(tiny_gpt2):
    with pytest.raises(ValueError, match="group: expected a positive integer, got 0"):
        next(kedit.edit_each(tiny_gpt2, _requests(1), "rome", group=0))
    with pytest.raises(ValueError, match="'alphaedit' keeps state"):
        next(kedit.edit_each(tiny_gpt2, _requests(1), "alphaedit"))
