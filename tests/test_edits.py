import pytest
import torch

import kedit
from kedit.edits import ModelMismatchError, WeightDelta
from kedit.methods.registry import HyperParams, MethodResult, MethodSpec

METHODS = ["rome", "r-rome", "ft-l", "ft-m"]


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    return load_requests(benchmark_path("knowedit"), n=n)


def _state(lm):
    return {name: value.clone() for name, value in lm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_undo_is_bit_exact_and_saved_edit_reapplies_identically(tiny_gpt2, method, tmp_path):
    lm = tiny_gpt2
    before = _state(lm)
    edit = kedit.edit(lm, _requests(2), method=method)
    edited = _state(lm)
    assert not _same(before, edited)
    path = edit.save(tmp_path / "e.kedit")
    edit.undo()
    assert _same(before, _state(lm))
    again = kedit.apply(lm, path)
    assert _same(edited, _state(lm))
    assert again.method == method and len(again.requests) == 2
    again.undo()
    assert _same(before, _state(lm))


def test_rome_edit_file_is_small(tiny_gpt2, tmp_path):
    with kedit.edit(tiny_gpt2, _requests(1), method="rome") as edit:
        path = edit.save(tmp_path / "one.kedit")
    weight_bytes = sum(p.numel() * 4 for p in tiny_gpt2.model.parameters())
    assert path.stat().st_size < 20_000 < weight_bytes


def test_apply_to_another_model_is_refused(tiny_gpt2, tiny_llama, tmp_path):
    with kedit.edit(tiny_gpt2, _requests(1), method="r-rome") as edit:
        path = edit.save(tmp_path / "g.kedit")
    before = _state(tiny_llama)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        kedit.apply(tiny_llama, path)
    assert _same(before, _state(tiny_llama))
    with pytest.raises(TypeError, match="lm: expected a kedit.LM"):
        kedit.apply("tiny-gpt2", path)
    with pytest.raises(ValueError, match="is a folder; give a .kedit file written by Edit.save"):
        kedit.apply(tiny_gpt2, tmp_path)


def test_undo_twice_and_apply_twice_are_refused(tiny_gpt2):
    edit = kedit.edit(tiny_gpt2, _requests(1), method="ft-m")
    with pytest.raises(RuntimeError, match="already applied"):
        edit.apply()
    edit.undo()
    with pytest.raises(RuntimeError, match="not applied"):
        edit.undo()


def _explodes(lm, requests, hparams):
    name = f"{lm.layout.mlp_out_name(0)}.weight"
    good = WeightDelta.from_dense(name, torch.ones_like(lm.model.get_parameter(name)))
    bad = WeightDelta.from_dense(name, torch.full_like(lm.model.get_parameter(name), torch.inf))
    return MethodResult([good, bad])


def test_non_finite_edit_leaves_model_unchanged(tiny_gpt2, monkeypatch):
    import kedit.methods.registry as registry

    spec = MethodSpec("test-explodes", _explodes, HyperParams, "test double", False, "rome")
    monkeypatch.setitem(registry._METHODS, spec.name, spec)
    monkeypatch.setattr(registry, "default_hparams", lambda method, lm: {})
    before = _state(tiny_gpt2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        kedit.edit(tiny_gpt2, _requests(1), method="test-explodes")
    assert _same(before, _state(tiny_gpt2))


def test_exception_mid_edit_leaves_model_unchanged(tiny_gpt2, monkeypatch):
    import kedit.methods.rome as rome

    calls = []
    real = rome.compute_rank_one

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(rome, "compute_rank_one", fail_on_second)
    before = _state(tiny_gpt2)
    with pytest.raises(RuntimeError, match="boom"):
        kedit.edit(tiny_gpt2, _requests(3), method="rome")
    assert _same(before, _state(tiny_gpt2))


def test_unknown_method_lists_available(tiny_gpt2):
    with pytest.raises(ValueError, match="available: .*rome"):
        kedit.edit(tiny_gpt2, _requests(1), method="nope")
    assert {"rome", "r-rome", "ft-l", "ft-m"} <= set(kedit.list_methods())


def _shared_factor(lm, requests, hparams):
    """Two layers' rank-one deltas built on one tensor, as KN's are (one direction per edit)."""
    direction = torch.full((lm.model.config.n_embd,), 1e-3)
    deltas = []
    for layer in (0, 1):
        name = f"transformer.h.{layer}.mlp.c_proj.weight"
        width = lm.model.get_parameter(name).shape[0]
        deltas.append(WeightDelta.low_rank(name, torch.ones(width, 1), direction[None, :]))
    return MethodResult(deltas)


def test_deltas_that_share_a_tensor_save_and_reapply(tiny_gpt2, monkeypatch, tmp_path):
    import kedit.methods.registry as registry

    spec = MethodSpec("test-shared", _shared_factor, HyperParams, "test double", False, "rome")
    monkeypatch.setitem(registry._METHODS, spec.name, spec)
    monkeypatch.setattr(registry, "default_hparams", lambda method, lm: {})
    before = _state(tiny_gpt2)
    edit = kedit.edit(tiny_gpt2, _requests(1), method="test-shared")
    edited = _state(tiny_gpt2)
    path = edit.save(tmp_path / "shared.kedit")
    edit.undo()
    again = kedit.apply(tiny_gpt2, path)
    assert _same(edited, _state(tiny_gpt2)) and not _same(before, edited)
    again.undo()
