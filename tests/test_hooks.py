"""Hooks capture and replace the right tensors, stop where asked, and always clean up."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_layout import HIDDEN, MLP_WIDTH, N_LAYERS, tiny_lm
from torch import nn

from kedit.hooks import (
    StopForward,
    capture,
    hooks,
    replace_input,
    replace_output,
    start_at_block,
    stop_after,
)
from kedit.layout import FAMILIES
from kedit.lm import LM

TEXTS = ["Mira Olsen lives in Oslo", "Tomas Berg lives in Lisbon. Mira Olsen", "The city"]

# Families plus variants whose layers differ (sliding-window attention on some layers only).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{family: (family, {}) for family in sorted(FAMILIES)},
    "qwen2-sliding": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    ),
    "mistral-sliding": ("mistral", {"sliding_window": 3}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices: threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(lm: LM) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch of rows of different lengths."""
    ids, mask = lm.pad([lm.encode(text) for text in TEXTS])
    assert not mask.all() and mask[:, 0].all()
    return ids, mask


def logits(lm: LM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def no_hooks_left(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


@pytest.fixture()
def gpt2() -> LM:
    return tiny_lm("gpt2")


def test_capture_matches_a_manual_computation(gpt2: LM) -> None:
    model, layout = gpt2.model, gpt2.layout
    ids, mask = batch(gpt2)
    block = model.transformer.h[1]
    names = {
        "block1": layout.block(1),
        "block0": layout.block(0),
        "ln_2": f"{layout.block(1)}.ln_2",
        "proj": layout.mlp_out_name(1),
    }
    with capture(model, [names["block1"], names["proj"]], "input") as inputs:
        with capture(model, [names["block0"], names["ln_2"], names["proj"]]) as outputs:
            full = logits(gpt2, ids, mask)
    torch.testing.assert_close(inputs[names["block1"]], outputs[names["block0"]])
    with torch.no_grad():
        key = block.mlp.act(block.mlp.c_fc(outputs[names["ln_2"]]))
        torch.testing.assert_close(inputs[names["proj"]], key)
        torch.testing.assert_close(outputs[names["proj"]], block.mlp.c_proj(key))
    assert inputs[names["proj"]].shape == (*ids.shape, MLP_WIDTH)
    assert outputs[names["proj"]].shape == (*ids.shape, HIDDEN)
    assert not any(t.requires_grad for t in (*inputs.values(), *outputs.values()))
    assert full.shape[:2] == ids.shape
    assert no_hooks_left(model)


def test_capture_without_detach_keeps_the_graph(gpt2: LM) -> None:
    ids, mask = batch(gpt2)
    name = gpt2.layout.mlp_out_name(0)
    with capture(gpt2.model, [name], detach=False) as out:
        gpt2.model(input_ids=ids, attention_mask=mask, use_cache=False)
    out[name].sum().backward()
    assert gpt2.model.get_parameter(f"{name}.weight").grad is not None


def test_capture_reads_a_hidden_states_keyword() -> None:
    class KeywordLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.linear(hidden_states)

    model = nn.Module()
    model.wrapped = KeywordLinear()
    x = torch.randn(2, 3, 4)
    with capture(model, ["wrapped"], "input") as seen:
        model.wrapped(hidden_states=x)
    assert torch.equal(seen["wrapped"], x)
    with replace_input(model, "wrapped", lambda t: t * 0), torch.no_grad():
        bias = model.wrapped.linear.bias
        assert torch.equal(model.wrapped(hidden_states=x), bias.expand(2, 3, 4))
    assert no_hooks_left(model)


def test_capture_rejects_an_unknown_what(gpt2: LM) -> None:
    with pytest.raises(ValueError, match="what='inputs'"):
        with capture(gpt2.model, [gpt2.layout.block(0)], "inputs"):
            pass


def test_capture_removes_its_hooks_on_an_exception(gpt2: LM) -> None:
    names = [gpt2.layout.block(0), gpt2.layout.mlp_out_name(1)]
    with pytest.raises(RuntimeError, match="boom"):
        with capture(gpt2.model, names, "input"), capture(gpt2.model, names):
            raise RuntimeError("boom")
    assert no_hooks_left(gpt2.model)


def test_replace_output_changes_the_logits_and_is_removed_after(gpt2: LM) -> None:
    ids, mask = batch(gpt2)
    before = logits(gpt2, ids, mask)
    with replace_output(gpt2.model, gpt2.layout.mlp_out_name(1), lambda out: out + 1.0):
        during = logits(gpt2, ids, mask)
    after = logits(gpt2, ids, mask)
    assert not torch.allclose(during, before)
    assert torch.equal(after, before)
    assert no_hooks_left(gpt2.model)


def test_replace_output_of_a_tuple_module_replaces_its_first_element(gpt2: LM) -> None:
    ids, mask = batch(gpt2)
    attn = gpt2.layout.attn_name(1)
    assert isinstance(gpt2.model.get_submodule(attn)(torch.zeros(1, 2, HIDDEN)), tuple)
    with replace_output(gpt2.model, attn, torch.zeros_like), capture(gpt2.model, [attn]) as seen:
        logits(gpt2, ids, mask)
    assert torch.equal(seen[attn], torch.zeros_like(seen[attn]))
    with capture(gpt2.model, [gpt2.layout.attn_out_name(1)]) as out:
        logits(gpt2, ids, mask)
    assert out[gpt2.layout.attn_out_name(1)].abs().max() > 0


def test_replace_input_feeds_the_module_the_new_tensor(gpt2: LM) -> None:
    ids, mask = batch(gpt2)
    norm, head = gpt2.layout.final_norm, gpt2.layout.unembed
    with replace_input(gpt2.model, norm, torch.zeros_like):
        during = logits(gpt2, ids, mask)
    with torch.no_grad():
        expected = gpt2.model.get_submodule(head)(
            gpt2.model.get_submodule(norm)(torch.zeros(*ids.shape, HIDDEN))
        )
    torch.testing.assert_close(during, expected)
    assert torch.equal(logits(gpt2, ids, mask), logits(gpt2, ids, mask))
    assert no_hooks_left(gpt2.model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_activations_are_batch_by_sequence_in_every_family(family: str) -> None:
    """Also where the family flattens tokens inside (OPT's MLP sees (batch * seq, width))."""
    lm = tiny_lm(family)
    ids, mask = batch(lm)
    name = lm.layout.mlp_out_name(1)
    with capture(lm.model, [name], "input") as keys, capture(lm.model, [name]) as values:
        before = logits(lm, ids, mask)
    assert keys[name].shape == (*ids.shape, MLP_WIDTH)
    assert values[name].shape == (*ids.shape, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(lm.model.get_submodule(name)(keys[name]), values[name])

    row, pos = 1, 4

    def bump(out: torch.Tensor) -> torch.Tensor:
        assert out.shape == (*ids.shape, HIDDEN)
        out = out.clone()
        out[row, pos] += 10.0
        return out

    with replace_output(lm.model, name, bump):
        after = logits(lm, ids, mask)
    changed = (after != before).any(-1)
    expected = torch.zeros_like(changed)
    expected[row, pos:] = True  # causal: only this row, from this position on
    assert torch.equal(changed, expected)


def test_stop_after_stops_the_forward_pass(gpt2: LM) -> None:
    ids, mask = batch(gpt2)
    early, late = gpt2.layout.mlp_out_name(0), gpt2.layout.block(2)
    reached = []
    with capture(gpt2.model, [early, late, gpt2.layout.final_norm]) as seen:
        with stop_after(gpt2.model, early):
            gpt2.model(input_ids=ids, attention_mask=mask, use_cache=False)
            reached.append("after the forward pass")
        reached.append("after the block")
    assert reached == ["after the block"]
    assert set(seen) == {early}
    assert no_hooks_left(gpt2.model)


def test_stop_before_a_module_has_its_input_but_runs_neither_it_nor_its_hooks(gpt2: LM) -> None:
    ids, mask = batch(gpt2)
    name = gpt2.layout.mlp_out_name(1)
    with capture(gpt2.model, [name], "input") as whole:
        gpt2.model(input_ids=ids, attention_mask=mask, use_cache=False)
    ran = []
    handle = gpt2.model.get_submodule(name).register_forward_hook(lambda *_: ran.append(name))
    try:
        with capture(gpt2.model, [name], "input") as seen, capture(gpt2.model, [name]) as out:
            with stop_after(gpt2.model, name, before=True):
                gpt2.model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    assert ran == [] and out == {}
    assert torch.equal(seen[name], whole[name])
    assert no_hooks_left(gpt2.model)


def test_stop_after_ends_only_its_own_block(gpt2: LM) -> None:
    ids, mask = batch(gpt2)
    early, late = gpt2.layout.block(0), gpt2.layout.block(2)
    reached = []
    with capture(gpt2.model, [late]) as seen, stop_after(gpt2.model, late):
        with stop_after(gpt2.model, early):
            gpt2.model(input_ids=ids, attention_mask=mask, use_cache=False)
        reached.append("after the inner block")
        gpt2.model(input_ids=ids, attention_mask=mask, use_cache=False)
        reached.append("after the second pass")  # the outer stop ended the outer block
    assert reached == ["after the inner block"]
    assert set(seen) == {late}

    reached.clear()
    with stop_after(gpt2.model, early):
        with stop_after(gpt2.model, late):  # never reached: the outer stop comes first
            gpt2.model(input_ids=ids, attention_mask=mask, use_cache=False)
        reached.append("the inner block must not swallow the outer stop")
    assert reached == []
    assert no_hooks_left(gpt2.model)


def test_stop_after_lets_other_errors_through(gpt2: LM) -> None:
    with pytest.raises(KeyError):
        with stop_after(gpt2.model, gpt2.layout.block(1)):
            raise KeyError("not a stop")
    with pytest.raises(StopForward):
        with stop_after(gpt2.model, gpt2.layout.block(1)):
            raise StopForward  # not raised by this context's hook
    assert no_hooks_left(gpt2.model)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_start_at_block_reproduces_the_full_forward_pass(variant: str) -> None:
    family, overrides = VARIANTS[variant]
    lm = tiny_lm(family, **overrides)
    model, layout = lm.model, lm.layout
    ids, mask = batch(lm)
    blocks = model.get_submodule(layout.blocks)
    names = [layout.block(layer) for layer in range(N_LAYERS)]
    with capture(model, names, "input") as seen:
        full = logits(lm, ids, mask)
    ran: list[nn.Module] = []
    for layer in range(N_LAYERS):
        ran.clear()
        handles = [b.register_forward_hook(lambda m, *_: ran.append(m)) for b in blocks[:layer]]
        try:
            with start_at_block(model, layout.blocks, layer, seen[names[layer]]):
                assert layout.n_layers(model) == N_LAYERS - layer
                started = logits(lm, ids, mask)
        finally:
            for handle in handles:
                handle.remove()
        assert not ran, f"blocks below {layer} ran"
        torch.testing.assert_close(started, full, atol=1e-5, rtol=1e-4)
        assert model.get_submodule(layout.blocks) is blocks and len(blocks) == N_LAYERS
        assert torch.equal(logits(lm, ids, mask), full)
    assert no_hooks_left(model)


@pytest.mark.parametrize("variant", ["gpt2", "qwen2-sliding"])
def test_start_at_block_restores_the_model_after_an_exception(variant: str) -> None:
    family, overrides = VARIANTS[variant]
    lm = tiny_lm(family, **overrides)
    model, layout = lm.model, lm.layout
    ids, mask = batch(lm)
    blocks = model.get_submodule(layout.blocks)
    config = model.config.to_dict()
    full = logits(lm, ids, mask)
    with capture(model, [layout.block(1)], "input") as seen:
        logits(lm, ids, mask)
    with pytest.raises(RuntimeError, match="boom"):
        with start_at_block(model, layout.blocks, 1, seen[layout.block(1)]):
            logits(lm, ids, mask)
            raise RuntimeError("boom")
    assert model.get_submodule(layout.blocks) is blocks
    assert list(model.get_submodule(layout.blocks)) == list(blocks)
    assert model.config.to_dict() == config
    assert no_hooks_left(model)
    assert torch.equal(logits(lm, ids, mask), full)


def test_start_at_block_lets_gradients_reach_the_started_layer(gpt2: LM) -> None:
    ids, mask = batch(gpt2)
    layout = gpt2.layout
    with capture(gpt2.model, [layout.block(1)], "input") as seen:
        logits(gpt2, ids, mask)
    with start_at_block(gpt2.model, layout.blocks, 1, seen[layout.block(1)]):
        gpt2.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.sum().backward()
    assert gpt2.model.get_parameter(f"{layout.mlp_out_name(1)}.weight").grad is not None
    assert gpt2.model.get_parameter(f"{layout.mlp_out_name(0)}.weight").grad is None


def test_hooks_enters_several_managers(gpt2: LM) -> None:
    ids, mask = batch(gpt2)
    first, second = gpt2.layout.block(0), gpt2.layout.block(1)
    with hooks(capture(gpt2.model, [first]), capture(gpt2.model, [second], "input")) as stores:
        logits(gpt2, ids, mask)
    assert len(stores) == 2
    torch.testing.assert_close(stores[0][first], stores[1][second])
    assert no_hooks_left(gpt2.model)
