import copy
import gc
import itertools
import json
import re
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kedit
from kedit.edits import Edit, UndoOrderError, WeightDelta
from kedit.lm import LM
from kedit.methods.registry import HyperParams, MethodResult, MethodSpec
from kedit.requests import EditRequest


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    return load_requests(benchmark_path("knowedit"), n=n)


def _state(lm):
    return {name: value.clone() for name, value in lm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rome_edit_file_is_small(tiny_gpt2, tmp_path):
    with kedit.edit(tiny_gpt2, _requests(1), method="rome") as edit:
        path = edit.save(tmp_path / "one.kedit")
    weight_bytes = sum(p.numel() * 4 for p in tiny_gpt2.model.parameters())
    assert path.stat().st_size < 20_000 < weight_bytes


def test_apply_checks_its_inputs(tiny_gpt2, tmp_path):
    with pytest.raises(TypeError, match="lm: expected a kedit.LM"):
        kedit.apply("tiny-gpt2", tmp_path / "e.kedit")
    with pytest.raises(ValueError, match="is a folder; give a .kedit file written by Edit.save"):
        kedit.apply(tiny_gpt2, tmp_path)
    with pytest.raises(FileNotFoundError, match="e.kedit' does not exist"):
        kedit.apply(tiny_gpt2, tmp_path / "e.kedit")


def test_undo_twice_and_apply_twice_are_refused(tiny_gpt2):
    edit = kedit.edit(tiny_gpt2, _requests(1), method="ft-m")
    with pytest.raises(RuntimeError, match="already applied"):
        edit.apply()
    edit.undo()
    with pytest.raises(RuntimeError, match="not applied"):
        edit.undo()


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


def _handmade(lm, subject, params, seed):
    """An edit of the named parameters by seeded random deltas, made without a method."""
    generator = torch.Generator().manual_seed(seed)
    deltas = [
        WeightDelta.from_dense(
            name, 1e-2 * torch.randn(lm.model.get_parameter(name).shape, generator=generator)
        )
        for name in params
    ]
    request = EditRequest(prompt="{} lives in", subject=subject, target_new=" Oslo")
    return Edit(lm, "handmade", {}, [request], deltas)


MLP0, MLP1, ATTN1, FC0 = (
    "transformer.h.0.mlp.c_proj.weight",
    "transformer.h.1.mlp.c_proj.weight",
    "transformer.h.1.attn.c_proj.weight",
    "transformer.h.0.mlp.c_fc.weight",
)


@pytest.fixture
def three_edits(random_gpt2):
    """Edits A, B, C applied in that order: A and B share a parameter, C shares none; with the
    state_dict before them and after each one."""
    lm = random_gpt2
    edits = {
        "A": _handmade(lm, "Ann", [MLP0, MLP1], seed=1),
        "B": _handmade(lm, "Bob", [MLP1, ATTN1], seed=2),
        "C": _handmade(lm, "Cid", [FC0], seed=3),
    }
    snapshots = [_state(lm)]
    for edit in edits.values():
        edit.apply()
        snapshots.append(_state(lm))
    return lm, edits, snapshots


def _expected(edits, snapshots, applied):
    """The state_dict with exactly the `applied` edits on: each parameter as the snapshot after
    the latest applied edit that touches it left it (the stack keeps each parameter's applied
    edits a prefix of those that touch it, so that snapshot holds the earlier ones too)."""
    state = dict(snapshots[0])
    for index, (label, edit) in enumerate(edits.items(), start=1):
        if label in applied:
            state.update({d.param: snapshots[index][d.param] for d in edit.deltas})
    return state


def _blockers(edits, label, applied):
    """Edits applied after `label` that share a parameter with it or with one of those."""
    order = list(edits)
    params = {d.param for d in edits[label].deltas}
    found = []
    for later in order[order.index(label) + 1 :]:
        touched = {d.param for d in edits[later].deltas}
        if later in applied and params & touched:
            found.append(later)
            params |= touched
    return found


@pytest.mark.parametrize("order", list(itertools.permutations("ABC")))
def test_undo_in_any_order_is_exact_or_refused_naming_the_later_edit(three_edits, order):
    lm, edits, snapshots = three_edits
    applied = set(edits)
    for label in order:
        blockers = _blockers(edits, label, applied)
        if blockers:
            names = "; ".join(
                f"#{list(edits).index(b) + 1} handmade edit of {edits[b].requests[0].subject!r}"
                for b in blockers
            )
            with pytest.raises(UndoOrderError, match=re.escape(names)):
                edits[label].undo()
            assert edits[label].applied
        else:
            edits[label].undo()
            applied.discard(label)
        assert _same(_expected(edits, snapshots, applied), _state(lm))
    for label in reversed(list(edits)):
        if label in applied:
            edits[label].undo()
    assert _same(snapshots[0], _state(lm))


@pytest.mark.parametrize("order", list(itertools.permutations("ABC")))
def test_cascading_undo_in_any_order_is_exact(three_edits, order):
    lm, edits, snapshots = three_edits
    applied = set(edits)
    for label in order:
        if label not in applied:
            continue
        gone = {label, *_blockers(edits, label, applied)}
        edits[label].undo(cascade=True)
        applied -= gone
        assert {k for k, edit in edits.items() if edit.applied} == applied
        assert _same(_expected(edits, snapshots, applied), _state(lm))
    assert not applied and _same(snapshots[0], _state(lm))


def test_a_reapplied_edit_goes_on_top(three_edits):
    lm, edits, snapshots = three_edits
    edits["A"].undo(cascade=True)
    assert not edits["B"].applied and edits["C"].applied
    edits["A"].apply()
    edits["B"].apply()
    with pytest.raises(
        UndoOrderError, match=r"'Ann' -> ' Oslo' \(#2 of 3 .*: #3 handmade edit of 'Bob'"
    ):
        edits["A"].undo()
    edits["C"].undo()
    assert _same(_expected(edits, snapshots, {"A", "B"}), _state(lm))
    edits["B"].undo()
    edits["A"].undo()
    assert _same(snapshots[0], _state(lm))


def test_an_edit_dropped_while_applied_still_blocks_the_edits_under_it(three_edits):
    lm, edits, snapshots = three_edits
    edits["C"].undo()
    dropped = weakref.ref(edits.pop("B"))
    gc.collect()
    assert dropped() is None
    with pytest.raises(UndoOrderError, match="#2 handmade edit of 'Bob'"):
        edits["A"].undo()
    edits["A"].undo(cascade=True)
    assert _same(snapshots[0], _state(lm))


def test_each_model_has_its_own_stack(random_gpt2):
    twin = LM(copy.deepcopy(random_gpt2.model), random_gpt2.tokenizer, name="twin")
    first = _handmade(random_gpt2, "Ann", [MLP0], seed=1).apply()
    other = _handmade(twin, "Bob", [MLP0], seed=2).apply()
    first.undo()
    assert other.applied and not first.applied
    other.undo()


def _data_start(path):
    """Offset of the tensor data in a safetensors file (after the 8-byte length and header)."""
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def _rewrite(path, offset, new_bytes):
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new_bytes)] = new_bytes
    path.write_bytes(bytes(data))


def test_an_edit_file_with_flipped_tensor_bytes_is_refused(random_gpt2, tmp_path):
    lm = random_gpt2
    before = _state(lm)
    with _handmade(lm, "Ann", [MLP0, ATTN1], seed=1).apply() as edit:
        good = edit.save(tmp_path / "good.kedit")
    start, size = _data_start(good), good.stat().st_size
    for offset in (start, start + (size - start) // 2, size - 1):
        bad = tmp_path / f"flipped-{offset}.kedit"
        bad.write_bytes(good.read_bytes())
        _rewrite(bad, offset, bytes([bad.read_bytes()[offset] ^ 0xFF]))
        # safetensors reads the file, with other numbers: only the digest tells.
        flipped, original = load_file(str(bad)), load_file(str(good))
        assert not all(torch.equal(flipped[k], original[k]) for k in original)
        with pytest.raises(ValueError, match=re.escape(f"{str(bad)!r} is damaged")):
            kedit.apply(lm, bad)
        assert _same(before, _state(lm))
    kedit.apply(lm, good).undo()


def test_an_edit_file_whose_metadata_was_changed_is_refused(random_gpt2, tmp_path):
    with _handmade(random_gpt2, "Ann", [MLP0], seed=1).apply() as edit:
        path = edit.save(tmp_path / "e.kedit")
    header = path.read_bytes()[: _data_start(path)]
    # The same length, still valid JSON: the edit would land on layer 1 instead of layer 0.
    moved = header.replace(b"transformer.h.0.mlp", b"transformer.h.1.mlp")
    assert moved != header
    _rewrite(path, 0, moved)
    with pytest.raises(ValueError, match="is damaged: its tensors or metadata do not match"):
        kedit.apply(random_gpt2, path)


def _resave_without_digest(path, version):
    """Write the file again without its digest, its metadata's version set to `version`."""
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["kedit"])
    meta["version"] = version
    save_file(load_file(str(path)), str(path), metadata={"kedit": json.dumps(meta)})


def test_a_version_1_file_without_digest_applies_with_a_warning(random_gpt2, tmp_path):
    lm = random_gpt2
    with _handmade(lm, "Ann", [MLP0], seed=1).apply() as edit:
        edited = _state(lm)
        path = edit.save(tmp_path / "old.kedit")
    _resave_without_digest(path, version=1)
    with pytest.warns(UserWarning, match=r"'.*old\.kedit' was saved without a digest"):
        again = kedit.apply(lm, path)
    assert _same(edited, _state(lm))
    again.undo()


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (2, "version 2 edit files carry a digest of their tensors and this one has none"),
        (3, "version 3 edit files carry a digest of their tensors and this one has none"),
        (4, "edit file version 4; this kedit reads versions 1..3"),
    ],
)
def test_a_file_without_the_digest_its_version_has_or_of_an_unknown_version_is_refused(
    random_gpt2, tmp_path, version, message
):
    with _handmade(random_gpt2, "Ann", [MLP0], seed=1).apply() as edit:
        path = edit.save(tmp_path / "e.kedit")
    _resave_without_digest(path, version)
    with pytest.raises(ValueError, match=re.escape(message)):
        kedit.apply(random_gpt2, path)
