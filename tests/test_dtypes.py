"""Big-model code paths on the CPU: half-precision weights, models split by a device map, and
batches sized to what fits."""

import importlib.util

import pytest
import torch

import kedit
from kedit.data import load_requests
from kedit.edits import WeightDelta
from kedit.lm import LM
from kedit.methods._locate import context_prefixes, optimize_values
from kedit.methods._memory import CPU_BUDGET_BYTES, backward_tokens, bytes_per_token
from kedit.methods.registry import list_methods, resolve_hparams
from kedit.requests import EditRequest
from kedit.zoo import benchmark_path

REQUEST = EditRequest(
    prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo", target_true=" Lisbon"
)
# Small settings for the 2-layer random models (every method, so a new one must say its own).
# At the prompt's last token, where the target is predicted, a delta at the last layer moves the
# target's probability (at the subject's token it could not: no later layer carries it over).
_LOCATE = {
    "v_steps": 5,
    "mom2_corpus": "tinyworld",
    "mom2_n_samples": 200,
    "prefix_lengths": [[3, 2]],
    "fact_token": "last",
}
HPARAMS = {
    "rome": {"layers": [1], **_LOCATE},
    "r-rome": {"layers": [1], **_LOCATE},
    "memit": {"layers": [0, 1], **_LOCATE},
    "emmet": {"layers": [1], **_LOCATE},
    "pmet": {"layers": [0, 1], **_LOCATE},
    "alphaedit": {"layers": [0, 1], "nullspace_threshold": 0.5, **_LOCATE},
    "ft-l": {"layers": [1], "steps": 5},
    "ft-m": {"layers": [1], "steps": 5},
    "kn": {"steps": 4},
    "lora": {"layers": [1], "steps": 5},
    "adalora": {"layers": [1], "steps": 8, "final_steps": 2},
    "grace": {"layers": [1], "steps": 5},
    "ultraedit": {"layers": [1]},
    "wise": {"layers": [1], "steps": 5, "irrelevant_corpus": "tinyworld"},
    "melo": {"layers": [1], "steps": 5},
    "ike": {"k": 2},
    "dinm": {"steps": 5},
    "dpo": {"layers": [1], "steps": 5},
}


def _random_model(family: str, tokenizer, dtype: torch.dtype) -> LM:
    """A seeded 2-layer GPT-2 or LLaMA with random weights in `dtype`."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    shared = {"vocab_size": len(tokenizer), "bos_token_id": eos, "eos_token_id": eos}
    if family == "gpt2":
        config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, **shared)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            pad_token_id=eos,
            **shared,
        )
        model = LlamaForCausalLM(config)
    return LM(model.to(dtype), tokenizer, name=f"random-{family}")


@pytest.fixture(
    scope="module",
    params=[
        (family, dtype) for family in ("gpt2", "llama") for dtype in (torch.float16, torch.bfloat16)
    ],
    ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}",
)
def half_model(request, bpe_tokenizer):
    family, dtype = request.param
    return _random_model(family, bpe_tokenizer, dtype)


# Methods that edit with an editor trained for one model; their half-precision test trains one
# for a random model (tests/test_trained_editors.py).
TRAINED_EDITORS = {"mend", "malmen", "serac"}
# (method, dtype) whose edit of the random half-precision models is non-finite today.
NON_FINITE: set[tuple[str, torch.dtype]] = set()


def test_every_registered_method_has_settings_here():
    assert sorted(HPARAMS) == sorted(set(list_methods()) - TRAINED_EDITORS)


@pytest.mark.parametrize("method", sorted(HPARAMS))
def test_every_method_edits_a_half_precision_model(half_model, method):
    lm = half_model
    dtype = lm.model.dtype
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    if (method, dtype) in NON_FINITE:
        # a known defect, kept visible: the edit is refused and the model left as it was
        with pytest.raises(FloatingPointError, match="non-finite"):
            kedit.edit(lm, REQUEST, method=method, hparams=HPARAMS[method])
        assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
        return
    edit = kedit.edit(lm, REQUEST, method=method, hparams=HPARAMS[method])
    assert edit.deltas
    if not all(isinstance(delta, WeightDelta) for delta in edit.deltas):
        _check_attached_edit(lm, edit, before, dtype)
        return
    # The deltas are kept in float32 and are finite.
    for delta in edit.deltas:
        assert delta.tensor().dtype == torch.float32
        assert torch.isfinite(delta.tensor()).all()
    # Every weight keeps the model's dtype; each touched one is written back in that dtype:
    # W ← (float32(W) + ΔW) rounded to the dtype, delta after delta.
    assert {p.dtype for p in lm.model.parameters()} == {dtype}
    expected = {}
    for delta in edit.deltas:
        start = expected.get(delta.param, before[delta.param])
        expected[delta.param] = (start.float() + delta.tensor()).to(dtype)
    now = lm.model.state_dict()
    for name, value in expected.items():
        assert torch.equal(now[name], value), name
    assert any(not torch.equal(value, before[name]) for name, value in expected.items())
    edit.undo()
    after = lm.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {p.dtype for p in lm.model.parameters()} == {dtype}


def _check_attached_edit(lm, edit, before, dtype) -> None:
    """An adaptor, memory or context edit of a half-precision model: the model's own weights
    stay as they were, in their dtype; what is attached is float32 and finite; undo leaves the
    state_dict as before, with nothing attached."""
    now = lm.model.state_dict()
    assert all(torch.equal(now[name], value) for name, value in before.items())
    assert {p.dtype for p in lm.model.parameters()} == {dtype}
    for name in now.keys() - before.keys():
        if now[name].is_floating_point():
            assert now[name].dtype == torch.float32 and bool(torch.isfinite(now[name]).all())
    edit.undo()
    after = lm.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_fine_tuning_adds_up_steps_below_a_bfloat16_weights_resolution(bpe_tokenizer):
    # Adam moves each weight by about lr per step. At lr = 1e-5 that is below half the bfloat16
    # spacing of most weights (2^-7 of their magnitude: about 5e-5 at the median |w| of 0.013),
    # so training the bfloat16 weights themselves would leave most of them unchanged; trained
    # as float32 copies, every weight moves by about steps × lr.
    lm = _random_model("gpt2", bpe_tokenizer, torch.bfloat16)
    lr, steps = 1e-5, 10
    hparams = {"layers": [1], "lr": lr, "steps": steps, "stop_nll": 0.0}
    with kedit.edit(lm, REQUEST, method="ft-l", hparams=hparams) as edit:
        assert edit.info["steps"] == steps
        (delta,) = edit.deltas
        moved = delta.tensor().abs()
    weight = lm.model.get_parameter(delta.param).detach().float().abs()
    assert float(weight.median()) * 2**-8 > lr  # most steps are below half the spacing
    assert float(moved.median()) > 0.5 * steps * lr


def _requests(n):
    return load_requests(benchmark_path("knowedit"), n=n)


def test_fine_tuning_in_several_batches_equals_one_batch(tiny_gpt2):
    requests = _requests(4)
    hparams = {"steps": 8}
    whole = kedit.edit(tiny_gpt2, requests, method="ft-m", hparams=hparams)
    whole.undo()
    # A budget below any request's tokens: one request per batch, gradients accumulated.
    split = kedit.edit(tiny_gpt2, requests, method="ft-m", hparams={**hparams, "batch_tokens": 1})
    split.undo()
    assert split.info["steps"] == whole.info["steps"]
    assert split.info["final_nll"] == pytest.approx(whole.info["final_nll"], rel=1e-4, abs=1e-6)
    (one,), (several,) = whole.deltas, split.deltas
    scale = one.tensor().abs().max()
    assert torch.allclose(several.tensor(), one.tensor(), atol=1e-4 * scale)


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_value_optimisation_in_chunks_equals_one_batch(model, request):
    lm = request.getfixturevalue(model)
    requests = _requests(3)
    params = resolve_hparams("memit", lm)
    layer = max(params.layers)
    prefixes, sites = context_prefixes(lm, params), [lm.layout.block(layer)]
    whole = optimize_values(lm, requests, layer, prefixes, params, sites)
    # A budget below any request's tokens: one request per chunk (other shapes than in one
    # batch, so equal up to float rounding).
    params.v_batch_tokens = 1
    chunked = optimize_values(lm, requests, layer, prefixes, params, sites)
    for (one,), (alone,) in zip(whole, chunked, strict=True):
        assert alone.steps == one.steps
        assert torch.allclose(alone.initial_output, one.initial_output, atol=1e-5)
        assert torch.allclose(alone.delta, one.delta, atol=1e-4 * one.delta.abs().max())


def test_default_batch_budget_is_4096_tokens_for_the_bundled_models(tiny_gpt2, tiny_llama):
    assert backward_tokens(tiny_gpt2, 0) == 4096
    assert backward_tokens(tiny_llama, 0) == 4096


def test_default_batch_budget_of_a_7b_llama_is_below_4096_tokens(bpe_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
    )
    with torch.device("meta"):  # shapes only: no memory
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    lm = LM(model, bpe_tokenizer, name="llama-7b-shapes")
    # From layer 8: 24 blocks × (8 · 4096 + 4 · 11008) bfloat16 values, and 32000 logits ×
    # (2 + 12) bytes.
    per_token = 24 * (8 * 4096 + 4 * 11008) * 2 + 32000 * 14
    assert bytes_per_token(lm, 8) == per_token
    assert backward_tokens(lm, 8) == CPU_BUDGET_BYTES // per_token < 4096


def test_load_in_half_precision(tiny_gpt2):
    lm = kedit.load("tiny-gpt2", dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.fingerprint != tiny_gpt2.fingerprint
    assert kedit.load("tiny-gpt2", dtype=torch.float16).model.dtype == torch.float16


def _edited(lm, requests, method):
    with kedit.edit(lm, requests, method=method) as edit:
        return {d.param: lm.model.get_parameter(d.param).detach().clone() for d in edit.deltas}


@pytest.mark.parametrize("method", ["rome", "memit", "ft-m", "kn"])
def test_a_model_placed_by_a_device_map_edits_as_one_loaded_plainly(tiny_llama, method):
    # Every module on the CPU, but through accelerate's hooks (the path of a split model).
    n = tiny_llama.n_layers
    device_map = {
        "model.embed_tokens": "cpu",
        **{f"model.layers.{i}": "cpu" for i in range(n)},
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    placed = kedit.load("tiny-llama", device_map=device_map)
    assert hasattr(placed.model.model.layers[0], "_hf_hook")
    requests = _requests(2)
    before = {name: value.clone() for name, value in placed.model.state_dict().items()}
    expected = _edited(tiny_llama, requests, method)
    got = _edited(placed, requests, method)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert all(torch.equal(before[n], v) for n, v in placed.model.state_dict().items())


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_load_with_a_device_map_on_a_cpu_only_machine(tiny_gpt2, device_map):
    lm = kedit.load("tiny-gpt2", device_map=device_map)
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
    requests = _requests(1)
    assert _edited(lm, requests, "rome").keys() == _edited(tiny_gpt2, requests, "rome").keys()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"dtype": "int8"},
            "dtype: expected one of float32, float16, bfloat16, float64, got 'int8'",
        ),
        ({"dtype": torch.int64}, "dtype: expected one of .*got torch.int64"),
        ({"device": "cpu", "device_map": "auto"}, "device_map: give either device .* not both"),
        ({"device_map": "gpu"}, "device_map: expected one of auto, balanced, .* got 'gpu'"),
        ({"device_map": {}}, "device_map: expected .* a non-empty"),
        ({"device_map": {"": "disk"}}, "device_map: '' is mapped to 'disk'"),
        ({"device_map": {"": 3}}, "device_map: module '' mapped to 3: 'cuda:3' asked for"),
        ({"device_map": {"lm_head": "cpu"}}, "device_map: .*does not give any device"),
    ],
)
def test_load_refuses_bad_dtypes_and_device_maps(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kedit.load("tiny-gpt2", **kwargs)


def test_a_device_map_without_accelerate_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec

    def without_accelerate(name, *args):
        return None if name == "accelerate" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_accelerate)
    with pytest.raises(ImportError, match="pip install accelerate"):
        kedit.load("tiny-gpt2", device_map="auto")


def test_load_refuses_a_model_whose_weights_were_offloaded(monkeypatch):
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained

    def offloading(*args, **kwargs):
        model = load(*args, **kwargs)
        # What accelerate leaves of a module it offloads: its weights on the meta device.
        model.transformer.h[1].mlp.c_proj.to("meta")
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offloading)
    with pytest.raises(ValueError, match="device_map: 'auto' offloads 2 weights .* in place"):
        kedit.load("tiny-gpt2", device_map="auto")


# Small settings for the 2-layer random models (every unlearning method says its own).
UNLEARN_HPARAMS = {
    "ga": {},
    "grad_diff": {},
    "ga_kl": {},
    "random_label": {},
    "npo": {},
    "simnpo": {},
    "memflex": {"sim_threshold": 1.0, "grad_threshold": 0.0},
    "rmu": {"layers": [0, 1], "steering": 5.0},
}


def test_every_unlearning_method_has_settings_here():
    from kedit.unlearn.registry import list_unlearning_methods

    assert sorted(UNLEARN_HPARAMS) == list_unlearning_methods()


@pytest.mark.parametrize("method", sorted(UNLEARN_HPARAMS))
def test_every_unlearning_method_unlearns_a_half_precision_model(half_model, method):
    lm = half_model
    dtype = lm.model.dtype
    forget = [("Mira Olsen lives in", " Oslo"), ("Mira Olsen works for", " Corvex")]
    retain = [("Wim Dunmont lives in", " Lisbon"), ("Wim Dunmont works for", " Rudd")]
    hparams = {**UNLEARN_HPARAMS[method], "steps": 3, "lr": 1e-3, "stop_forget_acc": None}
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    edit = kedit.unlearn(lm, forget, retain, method, hparams=hparams)
    assert edit.deltas and {p.dtype for p in lm.model.parameters()} == {dtype}
    now = lm.model.state_dict()
    for delta in edit.deltas:
        change = delta.tensor()
        assert change.dtype == torch.float32 and bool(torch.isfinite(change).all())
        # W ← float32(W) + ΔW, written back in the model's dtype
        assert torch.equal(now[delta.param], (before[delta.param].float() + change).to(dtype))
    assert any(not torch.equal(now[d.param], before[d.param]) for d in edit.deltas)
    edit.undo()
    after = lm.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
