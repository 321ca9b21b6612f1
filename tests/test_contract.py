"""The contract every registered editing method keeps, on the bundled models (not the wide one).

It runs for each name in `kedit.list_methods()`, so a method is held to it once registered:

1. reliability: after one edit per case at the method's defaults for the model, `target_new` is
   the teacher-forced argmax (every target token the argmax after the prompt and the gold
   target tokens before it; the prompt read in the context of applied context edits) for at
   least 90% of the cases' edit prompts;
2. undo restores every tensor of `state_dict()` bit-exactly, and no adaptor, memory or
   context is left, after each fresh edit and over 20 edit/undo cycles in a row;
3. save, then a fresh load of the model, then apply gives the edited weights (with the
   tensors of attached adaptors and memories, and the contexts) bit for bit; the other model
   refuses the file;
4. an exception at the method's last moment (its last update, then the final write) and a
   non-finite last update leave the model, and a stateful method's state, as they were;
5. two requests edited in batches of one give the weights of two single edits made one after
   the other; a method that computes many independent edits at once (`kedit.edit_each`) gives
   each request the single edit's update.

A method that misses a clause fails here unless the clause is waived for it below, with the
measured number and the reason: `RELIABILITY_WAIVERS` lowers clause 1's floor, and
`CLAUSE_WAIVERS` marks another clause as an expected failure (strict, so a fixed method has its
waiver removed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cache

import pytest
import torch

import kedit
import kedit.edits
from kedit.data import load_requests
from kedit.edits import (
    DELTA_KINDS,
    ContextDelta,
    Edit,
    ModelMismatchError,
    WeightDelta,
    in_context,
)
from kedit.methods.registry import get_method
from kedit.zoo import DATA_DIR

MODELS = ("tiny-gpt2", "tiny-llama", "tiny-chat")
N_CASES = 12
RELIABILITY_FLOOR = 0.9

# (method, model) -> the lower floor, what it reached on the contract's cases, and why.
RELIABILITY_WAIVERS: dict[tuple[str, str], dict[str, object]] = {
    ("kn", "tiny-gpt2"): {
        "floor": 9 / 12,
        "measured": "9/12 = 0.75, cases 1, 3, 10 missed (20/30 = 0.67 on the first 30 cases)",
        "reason": "KN adds the target's embedding direction to the value vectors of a few "
        "located neurons at one fixed scale, with no optimisation towards the target; at "
        "its tuned update_scale it moves the argmax for three cases in four.",
    },
    ("kn", "tiny-llama"): {
        "floor": 4 / 12,
        "measured": "4/12 = 0.33, only cases 3, 6, 8, 10 reached (14/30 = 0.47 on 30 cases)",
        "reason": "as on tiny-gpt2, KN's fixed-scale neuron update is not optimised towards "
        "the target, and on tiny-llama it reaches the target for fewer than half the cases.",
    },
    ("kn", "tiny-chat"): {
        "floor": 6 / 12,
        "measured": "7/12 = 0.58, cases 0, 1, 4, 8, 10 missed on the tiny-chat bundled on "
        "2026-12-07's evening (29/48 on the next 48 cases; 7/12 on the one before, 6/12 on x1, "
        "7/12 on the first)",
        "reason": "as on the narrow models, KN's fixed-scale neuron update is not optimised "
        "towards the target.",
    },
    ("mend", "tiny-chat"): {
        "floor": 9 / 12,
        "measured": "9/12 = 0.75, cases 0, 4, 10 missed (12/12 on the tiny-chat bundled before; "
        "0.925 reliability on 200 cases, docs/results.md#trained-editors-mend-malmen-serac)",
        "reason": "MEND's editor is a trained network, retrained for each bundled tiny-chat at "
        "its defaults; the one trained for the model bundled on 2026-12-07's evening maps about "
        "one edit in thirteen to a gradient step too small to make the target the argmax.",
    },
    ("malmen", "tiny-chat"): {
        "floor": 8 / 12,
        "measured": "8/12 = 0.67, cases 0, 1, 4, 10 missed (11/12 on the tiny-chat bundled "
        "before; 0.880 reliability on 200 cases)",
        "reason": "as MEND's: a trained editor whose single edits reach the target for 88% of "
        "the benchmark's cases on this model, fewer on these twelve.",
    },
    ("ultraedit", "tiny-chat"): {
        "floor": 10 / 12,
        "measured": "10/12 = 0.83, cases 4, 10 missed (11/12 on the tiny-chat bundled before); "
        "a larger step reaches them at a cost to locality (η 6e-3: 11/12, probe accuracy 0.913; "
        "8e-3: 12/12, 0.873; 4.5e-3: 0.950)",
        "reason": "UltraEdit makes one closed-form step at a fixed learning rate, not optimised "
        "to a target probability; tiny-chat's η keeps locality above the reliability it gives up.",
    },
    ("pmet", "tiny-llama"): {
        "floor": 9 / 12,
        "measured": "9/12 = 0.75, cases 2, 9, 11 missed (23/30 = 0.77 on the first 30 cases)",
        "reason": "PMET optimises the attention and MLP outputs jointly but writes only the "
        "MLP part: on the missed cases the optimisation meets its NLL target in 4-8 steps, and "
        "the MLP-only update leaves the target at probability 0.08-0.38 behind the old answer "
        "(the same with mom2_update_weight 1 or 200 value steps).",
    },
}

# (clause, method, model) -> why the method cannot keep that clause at all. Clauses:
# "reliability", "undo", "save_apply", "failure", "batches".
IKE_WAIVER = (
    "measured 0/12 (every case missed): IKE changes no parameter, it states the new fact (after "
    "retrieved demonstrations) before the prompt; the narrow models were trained on tinyworld "
    "statements only, never on a text that states a fact and then asks it, so a context does not "
    "move their answer. tiny-chat, trained to use stated facts, keeps the clause (12/12; "
    "docs/tiny-chat.md#in-context-and-ike)."
)
SERAC_WAIVER = (
    "no SERAC editor is bundled for tiny-llama: training one (scope classifier and "
    "counterfactual model) took 23 min on the loaded machine for tiny-gpt2 and did not fit the "
    "session that added SERAC (`kedit train serac -m tiny-llama --out "
    "src/kedit/zoo/editors/serac-tiny-llama` bundles one)"
)
CLAUSE_WAIVERS: dict[tuple[str, str, str], str] = {
    **{("reliability", "ike", model): IKE_WAIVER for model in ("tiny-gpt2", "tiny-llama")},
    **{
        (clause, "serac", "tiny-llama"): SERAC_WAIVER
        for clause in ("reliability", "undo", "save_apply", "failure", "batches")
    },
}


def _pairs(clause: str, only=lambda spec: True) -> list:
    """(method, model) for every registered method passing `only`, waived ones marked."""
    pairs = []
    for method in kedit.list_methods():
        if not only(get_method(method)):
            continue
        for model in MODELS:
            reason = CLAUSE_WAIVERS.get((clause, method, model))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            pairs.append(pytest.param(method, model, marks=marks, id=f"{method}-{model}"))
    return pairs


@cache
def _loaded_cases() -> tuple:
    return tuple(load_requests(DATA_DIR / "tinyworld_knowedit.json", n=N_CASES))


def _cases():
    return list(_loaded_cases())


def _visible(lm) -> dict[str, torch.Tensor]:
    """What an edit can change: the model's state_dict (with the tensors of attached adaptors
    and memories) and, where context edits are applied, each case's prompt as the model reads
    it (as bytes, under "context:<case>")."""
    state = dict(lm.model.state_dict())
    for index, case in enumerate(_loaded_cases()):
        read = in_context(lm.model, case.text)
        if read != case.text:
            state[f"context:{index}"] = torch.tensor(list(read.encode()), dtype=torch.uint8)
    return state


def _weights(lm, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A copy of `_visible`; tensors bit-identical to `base`'s are shared with it, not copied
    (the module keeps dozens of snapshots of edited models)."""
    base = base or {}
    return {
        name: base[name] if name in base and torch.equal(base[name], value) else value.clone()
        for name, value in _visible(lm).items()
    }


def _differing(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that are not bit-identical in the two state_dicts (or are in one
    only)."""
    names = expected.keys() | actual.keys()
    return sorted(
        n
        for n in names
        if n not in expected or n not in actual or not torch.equal(expected[n], actual[n])
    )


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@torch.no_grad()
def _target_is_argmax(lm, request) -> bool:
    """Every target token is the argmax given the prompt (in the context of applied context
    edits) and the gold target tokens before it."""
    prompt = lm.encode_prompt(in_context(lm.model, request.text))
    target = lm.encode(request.target_new)
    ids = torch.tensor([prompt + target], device=lm.device)
    logits = lm.model(input_ids=ids, use_cache=False).logits[0]
    predicted = logits[len(prompt) - 1 : len(prompt) + len(target) - 1].argmax(-1)
    return predicted.tolist() == target


class InjectedFailure(RuntimeError):
    """Raised by the contract inside a method, to check that a failure leaves no trace."""


@dataclass
class Run:
    """What the contract's shared edits of one method on one model left to check."""

    lm: object
    method: str
    model: str
    before: dict[str, torch.Tensor]
    cases: list
    edits: list[Edit] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)
    left_after_undo: list[list[str]] = field(default_factory=list)
    edited: dict[str, torch.Tensor] = field(default_factory=dict)
    saved: object = None
    folder: object = None
    two_step: dict | None = None

    @property
    def spec(self):
        return get_method(self.method)

    def new_state(self):
        return None if self.spec.state is None else self.spec.state()

    def edit_two_step(self, state) -> Edit:
        """The first two cases in one call, one after the other (batches of one)."""
        batch_size = 1 if self.spec.batchable else None
        return kedit.edit(self.lm, self.cases[:2], self.method, batch_size=batch_size, state=state)


@pytest.fixture(scope="module")
def lms(tiny_gpt2, tiny_llama):
    return {"tiny-gpt2": tiny_gpt2, "tiny-llama": tiny_llama, "tiny-chat": kedit.load("tiny-chat")}


@pytest.fixture(scope="module")
def originals(lms) -> dict[str, dict[str, torch.Tensor]]:
    """Each model's state_dict as the contract found it: every run must leave it so."""
    return {model: _weights(lm) for model, lm in lms.items()}


@pytest.fixture(scope="module")
def runs(lms, originals, tmp_path_factory) -> Iterator:
    """`get(method, model)`: the shared edits of that pair, made on first use.

    One edit per case at the defaults (each checked against the target, undone and checked
    against the weights before it), the first one saved while applied.
    """
    made: dict[tuple[str, str], Run] = {}
    folder = tmp_path_factory.mktemp("contract")

    def get(method: str, model: str) -> Run:
        if (method, model) not in made:
            lm = lms[model]
            run = Run(lm, method, model, originals[model], _cases(), folder=folder)
            for index, case in enumerate(run.cases):
                edit = kedit.edit(lm, case, method)
                run.edits.append(edit)
                run.hits.append(_target_is_argmax(lm, case))
                if index == 0:
                    run.edited = _weights(lm, run.before)
                    run.saved = edit.save(folder / f"{method}-{model}.kedit")
                edit.undo()
                run.left_after_undo.append(_differing(run.before, _visible(lm)))
            made[method, model] = run
        return made[method, model]

    yield get
    made.clear()


@pytest.fixture(scope="module")
def untouched_hits(lms) -> dict[str, list[bool]]:
    """Whether each case's target is already the argmax of the unedited model (it must not be,
    or a method that changes nothing would pass clause 1)."""
    return {model: [_target_is_argmax(lm, case) for case in _cases()] for model, lm in lms.items()}


@pytest.mark.parametrize(("method", "model"), _pairs("reliability"))
def test_the_edit_makes_the_target_the_answer(runs, untouched_hits, method, model):
    assert not any(untouched_hits[model]), "a contract case's target is the answer unedited"
    run = runs(method, model)
    waiver = RELIABILITY_WAIVERS.get((method, model))
    floor = waiver["floor"] if waiver else RELIABILITY_FLOOR
    reached = sum(run.hits) / len(run.hits)
    missed = [index for index, hit in enumerate(run.hits) if not hit]
    summary = f"{method} on {model}: target_new is the teacher-forced argmax for " + (
        f"{sum(run.hits)}/{len(run.hits)} cases (floor {floor:.3f}); missed cases {missed}"
    )
    assert reached >= floor - 1e-9, summary
    assert not waiver or reached < RELIABILITY_FLOOR, f"{summary}: remove its waiver"


def test_every_reliability_waiver_names_a_registered_method_and_says_why():
    for (method, model), waiver in RELIABILITY_WAIVERS.items():
        assert method in kedit.list_methods() and model in MODELS
        assert 0 < waiver["floor"] < RELIABILITY_FLOOR
        assert waiver["measured"] and waiver["reason"]


@pytest.mark.parametrize(("method", "model"), _pairs("undo"))
def test_undo_restores_every_tensor_bit_exactly(runs, method, model):
    run = runs(method, model)
    assert _differing(run.before, run.edited), "the edit changed nothing"
    assert run.left_after_undo == [[]] * len(run.edits)
    for cycle in range(20):
        edit = run.edits[cycle % len(run.edits)]
        edit.apply()
        edit.undo()
        assert not _differing(run.before, _visible(run.lm)), f"after cycle {cycle}"


@pytest.fixture(scope="module")
def fresh_lms() -> Iterator:
    """`get(model)`: a second load of the bundled model, made on first use."""
    loaded = {}

    def get(model: str):
        if model not in loaded:
            loaded[model] = kedit.load(model)
        return loaded[model]

    yield get
    loaded.clear()


@pytest.mark.parametrize(("method", "model"), _pairs("save_apply"))
def test_a_saved_edit_reapplies_bit_exactly_to_a_fresh_load_only(
    runs, fresh_lms, lms, method, model
):
    run = runs(method, model)
    two_step = _two_step(run)
    fresh = fresh_lms(model)
    assert not _differing(run.before, _visible(fresh))
    for path, requests, edited in [
        (run.saved, run.cases[:1], run.edited),
        (two_step["saved"], run.cases[:2], two_step["weights"]),
    ]:
        again = kedit.apply(fresh, path)
        assert again.method == method and again.requests == requests
        assert not _differing(edited, _visible(fresh))
        again.undo()
        assert not _differing(run.before, _visible(fresh))

    other = lms[next(name for name in MODELS if name != model)]
    untouched = _weights(other)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        kedit.apply(other, run.saved)
    assert not _differing(untouched, _visible(other))


@contextmanager
def _on_each_update(act) -> Iterator[None]:
    """Call `act(change)` on every change a method makes inside the block (a WeightDelta, or an
    adaptor, memory or context change: every kind in `kedit.edits.DELTA_KINDS`)."""
    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for kind in DELTA_KINDS.values():

            def hooked(self, make=kind.__post_init__):
                make(self)
                act(self)

            patch.setattr(kind, "__post_init__", hooked)
        yield


@contextmanager
def _counting() -> Iterator[dict[str, int]]:
    """Count the updates a method computes (changes made, of any kind) and the writes into the
    model (calls of `kedit.edits.apply_deltas`) inside the block."""
    counts = {"updates": 0, "writes": 0}
    write = kedit.edits.apply_deltas

    def counted_make(change):
        counts["updates"] += 1

    def counted_write(*args, **kwargs):
        counts["writes"] += 1
        return write(*args, **kwargs)

    with _on_each_update(counted_make), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kedit.edits, "apply_deltas", counted_write)
        yield counts


def _two_step(run: Run) -> dict:
    """The first two cases edited in one call at batches of one, on a state that has seen them
    once already: how many updates and writes it takes, the weights it leaves, and its file."""
    if run.two_step is None:
        state = run.new_state()
        run.edit_two_step(state).undo()
        with _counting() as counts:
            edit = run.edit_two_step(state)
        assert counts["updates"] >= 1, (
            f"{run.method} makes no change of a kind in kedit.edits.DELTA_KINDS: give the "
            "contract another way to inject a failure at its last moment"
        )
        saved = edit.save(run.folder / f"{run.method}-{run.model}-two.kedit")
        weights = _weights(run.lm, run.before)
        run.two_step = {**counts, "state": state, "weights": weights, "saved": saved}
        edit.undo()
        assert not _differing(run.before, _visible(run.lm))
    return run.two_step


def _poisoned(tensor: torch.Tensor, value: float) -> torch.Tensor:
    tensor = tensor.clone(memory_format=torch.contiguous_format)
    tensor.view(-1)[-1] = value
    return tensor


class OnlyText(Exception):
    """A change without numbers (a context edit holding only its text) cannot be non-finite."""


def _poison(delta) -> None:
    """Make one entry of the update non-finite (of a weight delta's factors, an adaptor's
    tensors, a memory's appended or overwritten rows)."""
    if isinstance(delta, ContextDelta) and not any(
        t.is_floating_point() for t in delta.tensors.values()
    ):
        raise OnlyText(f"the {delta.context!r} context holds no tensors, only its text")
    if isinstance(delta, WeightDelta):
        if delta.dense is not None:
            delta.dense = _poisoned(delta.dense, float("nan"))
        else:
            delta.right = _poisoned(delta.right, float("inf"))
        return
    tensors = getattr(delta, "tensors", None) or getattr(delta, "appended", None) or {}
    floating = [n for n in reversed(list(tensors)) if tensors[n].is_floating_point()]
    if floating:
        tensors[floating[0]] = _poisoned(tensors[floating[0]], float("nan"))
    else:  # a memory change that appends no floating rows (token ids) overwrites some
        name = next(
            n for n in reversed(list(delta.changed)) if delta.changed[n][1].is_floating_point()
        )
        index, values = delta.changed[name]
        delta.changed[name] = (index, _poisoned(values, float("nan")))


@contextmanager
def _at_last_update(count: int, act) -> Iterator[None]:
    """Call `act(delta)` on the `count`-th change made inside the block."""
    made = []

    def counted(change):
        made.append(1)
        if len(made) == count:
            act(change)

    with _on_each_update(counted):
        yield


@contextmanager
def _at_last_write(count: int) -> Iterator[None]:
    """Raise at the `count`-th call of `kedit.edits.apply_deltas` inside the block."""
    write, calls = kedit.edits.apply_deltas, []

    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            raise InjectedFailure("injected at the last write")
        return write(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kedit.edits, "apply_deltas", hooked)
        yield


def _raise(delta) -> None:
    raise InjectedFailure(f"injected at the last update ({', '.join(sorted(delta.targets))})")


FAILURES = {
    "exception at the last update": (
        lambda counts: _at_last_update(counts["updates"], _raise),
        InjectedFailure,
    ),
    "non-finite last update": (
        lambda counts: _at_last_update(counts["updates"], _poison),
        FloatingPointError,
    ),
    "exception at the last write": (
        lambda counts: _at_last_write(counts["writes"]),
        InjectedFailure,
    ),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize(("method", "model"), _pairs("failure"))
def test_a_failure_at_the_last_moment_leaves_model_and_state_untouched(
    runs, method, model, failure
):
    run = runs(method, model)
    two_step = _two_step(run)
    state = two_step["state"]
    state_before = None if state is None else dict(vars(state))
    inject, error = FAILURES[failure]
    with inject(two_step), pytest.raises((error, OnlyText)) as raised:
        run.edit_two_step(state)
    assert not _differing(run.before, _visible(run.lm))
    if state is not None:
        assert _same_value(state_before, dict(vars(state)))
    if raised.errisinstance(OnlyText):
        pytest.skip(f"{raised.value}: nothing to make non-finite (rolled back as an exception)")


@pytest.mark.parametrize(("method", "model"), _pairs("batches"))
def test_batches_of_one_equal_single_edits_one_after_the_other(runs, method, model):
    run = runs(method, model)
    two_step = _two_step(run)
    state = run.new_state()
    if state is not None:  # the same history as the two-step run's state: these cases once
        run.edit_two_step(state).undo()
    singles = [kedit.edit(run.lm, case, method, state=state) for case in run.cases[:2]]
    weights = _weights(run.lm)
    for edit in reversed(singles):
        edit.undo()
    for name in weights:
        torch.testing.assert_close(weights[name], two_step["weights"][name], msg=name)


@pytest.mark.parametrize(("method", "model"), _pairs("batches", lambda spec: spec.each))
def test_edits_computed_together_equal_each_single_edit(runs, method, model):
    run = runs(method, model)
    together = list(kedit.edit_each(run.lm, run.cases[:2], method, group=2))
    for mine, single in zip(together, run.edits[:2], strict=True):
        assert [d.param for d in mine.deltas] == [d.param for d in single.deltas]
        for a, b in zip(mine.deltas, single.deltas, strict=True):
            torch.testing.assert_close(a.tensor(), b.tensor(), atol=1e-5, rtol=1e-3)
