"""What the searches behind an edit leave out must not change what they find: steps that start
above the edited block equal steps that run it with hooks, context prefixes' shared keys and
values equal the prefixes run inline, cached work follows the weights, and deltas are applied
once."""

import pytest
import torch
from test_layout import tiny_lm

import kedit
from kedit.edits import WeightDelta, all_finite, compute_in_sequence, weights_version
from kedit.hooks import start_at_block
from kedit.methods import _above, _locate, _tune
from kedit.methods._locate import context_prefixes, optimize_values, prefix_states
from kedit.methods.registry import resolve_hparams


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    return load_requests(benchmark_path("knowedit"), n=n)


def _same_values(found, expected):
    for (one,), (other,) in zip(found, expected, strict=True):
        assert one.steps == other.steps
        scale = other.delta.abs().max()
        assert torch.allclose(one.delta, other.delta, atol=1e-4 * scale)
        assert torch.allclose(one.initial_output, other.initial_output, atol=1e-5)
        for layer, keys in other.keys.items():
            assert torch.allclose(one.keys[layer], keys, atol=1e-5)


def test_a_delta_adds_to_the_block_output_at_the_mlp_output_not_at_the_attention_output(
    tiny_gpt2, tiny_llama
):
    for lm in (tiny_gpt2, tiny_llama):
        layout = lm.layout
        assert _above.adds_to_block_output(lm, 1, layout.mlp_out_name(1))
        assert _above.adds_to_block_output(lm, 1, layout.block(1))
        # The attention's output goes through the MLP before it reaches the block's output.
        assert not _above.adds_to_block_output(lm, 1, layout.attn_out_name(1))


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_steps_that_start_above_the_block_find_what_steps_through_it_with_hooks_find(
    model, method, request, monkeypatch
):
    lm = request.getfixturevalue(model)
    params = resolve_hparams(method, lm, {"prefix_lengths": [[4, 2]], "v_steps": 8})
    layer = max(params.layers)
    site = lm.layout.mlp_out_name(layer) if method == "rome" else lm.layout.block(layer)
    requests, prefixes = _requests(3), context_prefixes(lm, params)
    above = optimize_values(lm, requests, layer, prefixes, params, [site], key_layers=[layer])
    monkeypatch.setattr(_locate, "adds_to_block_output", lambda *args: False)
    hooked = optimize_values(lm, requests, layer, prefixes, params, [site], key_layers=[layer])
    _same_values(above, hooked)


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_shared_prefix_keys_and_values_equal_the_prefixes_run_with_each_prompt(
    model, request, monkeypatch
):
    lm = request.getfixturevalue(model)
    params = resolve_hparams("rome", lm, {"layers": [1], "v_steps": 8})
    site = lm.layout.mlp_out_name(1)
    requests, prefixes = _requests(3), context_prefixes(lm, params)
    assert prefix_states(lm, prefixes).width > 1
    shared = optimize_values(lm, requests, 1, prefixes, params, [site], key_layers=[1])
    monkeypatch.setattr(_locate, "prefix_states", lambda *args: None)
    inline = optimize_values(lm, requests, 1, prefixes, params, [site], key_layers=[1])
    _same_values(shared, inline)


def test_prefix_keys_and_values_follow_the_weights_across_an_edit_and_its_undo(tiny_gpt2):
    lm = tiny_gpt2
    params = resolve_hparams("rome", lm, {"layers": [1]})
    prefixes = context_prefixes(lm, params)
    before, version = prefix_states(lm, prefixes), weights_version(lm.model)
    hparams = {"layers": [1], "mom2_adjustment": False}
    with kedit.edit(lm, _requests(1), method="rome", hparams=hparams):
        assert weights_version(lm.model) != version
        edited = prefix_states(lm, prefixes)
        assert edited is not before
        # Layer 1's update reaches the prefixes' keys and values from block 2 on, not below.
        assert torch.equal(edited.kv[1][0], before.kv[1][0])
        assert not torch.allclose(edited.kv[2][0], before.kv[2][0])
    assert weights_version(lm.model) == version
    again = prefix_states(lm, prefixes)
    assert torch.equal(again.kv[-1][0], before.kv[-1][0])
    with torch.no_grad():
        lm.model.transformer.h[0].mlp.c_proj.weight.mul_(1.0)  # a write outside kedit
    assert weights_version(lm.model) != version
    assert prefix_states(lm, prefixes) is not again


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("fact_token", ["subject_last", "last"])
@pytest.mark.parametrize("additive", [True, False])
def test_lookups_from_the_lowest_edited_blocks_input_equal_the_whole_model_run_again(
    model, fact_token, additive, request, monkeypatch
):
    # Where an edited projection's output adds to its block's (both bundled architectures),
    # a lookup starts above that block from its unedited output plus the projection's change,
    # and passes the next lookup what it needs to start above the next edited block;
    # elsewhere (here forced) each lookup starts at the lowest edited block's input.
    lm = request.getfixturevalue(model)
    if not additive:
        monkeypatch.setattr(_locate, "adds_to_block_output", lambda *args: False)
    lower, middle, upper = 1, 2, 3
    params = resolve_hparams(
        "memit",
        lm,
        {"layers": [lower, middle, upper], "prefix_lengths": [[4, 2]], "fact_token": fact_token},
    )
    requests, prefixes = _requests(3), context_prefixes(lm, params)
    assert prefix_states(lm, prefixes).width > 1
    site = lm.layout.block(upper)
    found = optimize_values(
        lm, requests, upper, prefixes, params, [site], key_layers=[lower], input_of=lower
    )
    inputs = [f.block_input for (f,) in found]
    projection = lm.layout.mlp_out_name(lower) if additive else None
    assert all(i.layer == lower + additive and i.projection == projection for i in inputs)
    # Blocks from the input's block up change (as a spread over layers changes them), the
    # middle one again between the lookups; each lookup must see them as a whole run does.
    generator = torch.Generator().manual_seed(0)
    weights = [
        lm.model.get_parameter(lm.layout.mlp_out_name(layer) + ".weight")
        for layer in (lower, middle, upper)
    ]
    originals = [weight.detach().clone() for weight in weights]

    def change(weight: torch.Tensor) -> None:
        with torch.no_grad():
            weight.add_(0.05 * weight.std() * torch.randn(weight.shape, generator=generator))

    monkeypatch.setattr(_locate, "backward_tokens", lambda *args: 1)  # one request a pass
    try:
        for weight in weights:
            change(weight)
        whole = _locate.lookup_activations(lm, requests, prefixes, fact_token, [middle], [site])
        *resumed, kept = _locate.lookup_from_block(lm, inputs, [middle], [site], keep=middle)
        change(weights[1])
        whole_next = _locate.lookup_activations(lm, requests, prefixes, fact_token, [upper], [site])
        *resumed_next, _ = _locate.lookup_from_block(lm, kept, [upper], [site])
    finally:
        with torch.no_grad():
            for weight, original in zip(weights, originals, strict=True):
                weight.copy_(original)
    assert all(i.layer == middle + 1 for i in kept)
    pairs = [
        (resumed[0][middle], whole[0][middle]),
        (resumed[1][site], whole[1][site]),
        (resumed_next[0][upper], whole_next[0][upper]),
        (resumed_next[1][site], whole_next[1][site]),
    ]
    for got, expected in pairs:
        assert got.shape == expected.shape == (3, len(prefixes), expected.shape[-1])
        assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max())


def test_a_spread_too_large_to_keep_the_lowest_blocks_input_runs_the_model_to_the_same_edit(
    tiny_gpt2, monkeypatch
):
    from kedit.methods import _spread

    requests = _requests(3)
    hparams = {"layers": [1, 2], "prefix_lengths": [[4, 2]]}
    kept = kedit.edit(tiny_gpt2, requests, method="memit", hparams=hparams)
    kept.undo()
    calls = []
    lookup = _spread.lookup_activations
    monkeypatch.setattr(_spread, "BLOCK_INPUT_BYTES", 0)
    monkeypatch.setattr(
        _spread, "lookup_activations", lambda *args: calls.append(1) or lookup(*args)
    )
    rerun = kedit.edit(tiny_gpt2, requests, method="memit", hparams=hparams)
    rerun.undo()
    assert calls == [1]  # the second layer's lookup
    assert kept.info["value_steps"] == rerun.info["value_steps"]
    for one, other in zip(kept.deltas, rerun.deltas, strict=True):
        scale = other.tensor().abs().max()
        assert torch.allclose(one.tensor(), other.tensor(), atol=1e-4 * scale)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_projections_change_added_to_its_output_is_what_writing_it_changes(family):
    lm = tiny_lm(family)
    name = lm.layout.mlp_out_name(1)
    projection = lm.model.get_submodule(name)
    inputs = torch.randn(2, 5, lm.layout.in_out(projection.weight)[0])
    generator = torch.Generator().manual_seed(0)
    out_width = lm.layout.in_out(projection.weight)[1]
    left, right = torch.randn(out_width, 2, generator=generator), torch.randn(2, inputs.shape[-1])
    # ΔW = left @ right as (out × in); in the parameter's own orientation for the delta:
    dense = left @ right if not lm.layout.conv1d else (left @ right).T
    factors = (left, right) if not lm.layout.conv1d else (right.T, left.T)
    with torch.no_grad():
        before = projection(inputs)
        for change in (
            WeightDelta.from_dense(f"{name}.weight", dense),
            WeightDelta.low_rank(f"{name}.weight", *factors),
        ):
            projection.weight.add_(dense)
            expected = projection(inputs) - before
            projection.weight.sub_(dense)
            got = _locate.projection_change(lm, change, inputs)
            assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])  # Conv1D and Linear
@pytest.mark.parametrize("additive", [True, False])
def test_a_spread_writes_its_deltas_once_where_each_lookup_adds_the_last_change(
    model, additive, request, monkeypatch
):
    import kedit.edits as edits
    from kedit.methods import _spread

    lm = request.getfixturevalue(model)
    requests, hparams = _requests(2), {"layers": [1, 2, 3], "prefix_lengths": [[4, 2]]}
    expected = kedit.edit(lm, requests, method="memit", hparams=hparams)
    expected.undo()
    if not additive:  # each lookup starts at the lowest edited block: deltas written between
        monkeypatch.setattr(_spread, "adds_to_block_output", lambda *args: False)
        monkeypatch.setattr(_locate, "adds_to_block_output", lambda *args: False)
    writes = []
    apply_deltas = edits.apply_deltas
    monkeypatch.setattr(edits, "apply_deltas", lambda *a: writes.append(1) or apply_deltas(*a))
    edit = kedit.edit(lm, requests, method="memit", hparams=hparams)
    edit.undo()
    assert len(writes) == (1 if additive else 3)  # the edit's own; + two between the lookups
    for one, other in zip(edit.deltas, expected.deltas, strict=True):
        scale = other.tensor().abs().max()
        assert torch.allclose(one.tensor(), other.tensor(), atol=1e-4 * scale)


def _run_above(lm, above, hidden):
    """(the replayed output, the base's own output) for `hidden` at Above's first block."""
    ids = torch.tensor([lm.encode("Mira Olsen lives in Oslo")], device=lm.device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        above(hidden, ids, mask)  # runs the base and records
        replayed = above(hidden * 0.5, ids, mask)
        base = _base_from(lm, above.first, hidden * 0.5, ids, mask)
    return replayed, base


def _base_from(lm, first, hidden, ids, mask):
    """The model's base run with `hidden` fed to block `first`."""
    with start_at_block(lm.model, lm.layout.blocks, first, hidden):
        return lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)[0]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "phi", "opt"])
def test_replaying_the_blocks_above_equals_running_the_models_base(family):
    lm = tiny_lm(family)
    above = _above.Above(lm, 1)
    width = lm.model.get_input_embeddings().weight.shape[1]
    hidden = torch.randn(1, len(lm.encode("Mira Olsen lives in Oslo")), width)
    replayed, base = _run_above(lm, above, hidden)  # the base reads `above._hidden`: hidden/2
    assert lm.cache[("above_replay", 1, False)] is True
    assert torch.allclose(replayed, base, atol=1e-6)


def test_a_base_that_does_more_than_its_blocks_is_not_replayed(random_gpt2, monkeypatch):
    lm = random_gpt2
    forward = lm.model.base_model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.last_hidden_state = out.last_hidden_state * 2.0
        return out

    monkeypatch.setattr(lm.model.base_model, "forward", scaled)
    above = _above.Above(lm, 1)
    hidden = torch.randn(1, len(lm.encode("Mira Olsen lives in Oslo")), 32)
    try:
        replayed, base = _run_above(lm, above, hidden)
        assert lm.cache[("above_replay", 1, False)] is False
        assert torch.equal(replayed, base)
    finally:
        lm.cache.pop(("above_replay", 1, False), None)  # the fixture is shared


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_primed_first_call_replays_what_the_base_computes_without_running_it(family, monkeypatch):
    lm = tiny_lm(family)
    ids = torch.tensor([lm.encode("Mira Olsen lives in Oslo")], device=lm.device)
    mask = torch.ones_like(ids)
    width = lm.model.get_input_embeddings().weight.shape[1]
    hidden = torch.randn(1, ids.shape[1], width)
    _run_above(lm, _above.Above(lm, 1), hidden)  # the once-per-model replay check
    assert _above.uniform_block_arguments(lm) is True
    above = _above.Above(lm, 1)
    with torch.no_grad(), above.primed(ids, mask):
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)  # the caller's own pass

    def no_base(*args, **kwargs):
        raise AssertionError("the primed call ran the base")

    monkeypatch.setattr(above, "_run_base", no_base)
    with torch.no_grad():
        replayed = above(hidden, ids, mask)
        base = _base_from(lm, 1, hidden, ids, mask)
    assert torch.allclose(replayed, base, atol=1e-6)


@pytest.mark.parametrize("window", [4, 4096])  # shorter than the check's texts, and longer
def test_blocks_with_their_own_masks_are_not_primed(window):
    lm = tiny_lm(
        "qwen2",
        use_sliding_window=True,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_window_layers=0,
    )
    assert _above.uniform_block_arguments(lm) is False
    assert _above.uniform_block_arguments(tiny_lm("qwen2")) is True


def test_fine_tuning_from_above_the_trained_block_equals_running_it(tiny_gpt2, monkeypatch):
    requests = _requests(3)
    hparams = {"layers": [4], "steps": 6}
    above = kedit.edit(tiny_gpt2, requests, method="ft-m", hparams=hparams)
    above.undo()
    monkeypatch.setattr(_tune, "adds_to_block_output", lambda *args: False)
    through = kedit.edit(tiny_gpt2, requests, method="ft-m", hparams=hparams)
    through.undo()
    assert above.info["steps"] == through.info["steps"]
    (one,), (other,) = above.deltas, through.deltas
    assert torch.allclose(one.tensor(), other.tensor(), atol=1e-4 * other.tensor().abs().max())


def test_compute_in_sequence_applies_every_items_deltas_but_the_last(random_gpt2, monkeypatch):
    import kedit.edits as edits

    model = random_gpt2.model
    name = "transformer.h.0.mlp.c_proj.weight"
    weight = model.get_parameter(name)
    original = weight.detach().clone()
    seen, writes = [], []
    write = edits.apply_deltas

    def counted(*args):
        writes.append(1)
        return write(*args)

    def compute(item):
        seen.append(weight.detach().clone())
        return [WeightDelta.from_dense(name, torch.full_like(original, float(item)))]

    monkeypatch.setattr(edits, "apply_deltas", counted)
    deltas = compute_in_sequence(model, [1, 2, 4], compute)
    assert len(writes) == 2 and len(deltas) == 3
    for before, total in zip(seen, [0.0, 1.0, 3.0], strict=True):
        assert torch.allclose(before, original + total)
    assert torch.equal(weight.detach(), original)


def test_all_finite_is_exact_also_where_the_sum_overflows():
    assert all_finite(torch.tensor([3e38, 3e38, -1.0]))  # the sum overflows, the entries do not
    assert all_finite(torch.zeros(0))
    assert not all_finite(torch.tensor([1.0, float("inf")]))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))
