"""Every `Layout` in `FAMILIES` names the right modules of a tiny random model of its family.

Also: unsupported architectures fail clearly, fingerprints are stable, and ROME/FT edits run
and undo bit-exactly on every family. The tiny models and tokenizer built here are reused by
`test_hooks.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

import kedit
from kedit.hooks import capture
from kedit.layout import FAMILIES, Layout, UnsupportedArchitectureError, layout_for
from kedit.lm import LM, model_fingerprint

EOS = "<|endoftext|>"
VOCAB = 320
HIDDEN = 32
MLP_WIDTH = 64
N_LAYERS = 3
HEADS = 4

TEXT = [
    "Mira Olsen lives in Oslo.",
    "Mira Olsen lives in Lisbon.",
    "Tomas Berg lives in Oslo.",
    "The city of Oslo is a city in Norway.",
    "Therefore she lives in Oslo. Because I live in Lisbon, you live in Oslo.",
    "Mira Olsen is a doctor. Tomas Berg is a teacher.",
]

_LLAMA_LIKE = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": 2,
    "intermediate_size": MLP_WIDTH,
    "head_dim": HIDDEN // HEADS,
}

# Config keyword arguments of a tiny model per family (the MLP width is always MLP_WIDTH).
CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": HIDDEN, "n_layer": N_LAYERS, "n_head": HEADS, "n_inner": MLP_WIDTH},
    "gptj": {
        "n_embd": HIDDEN,
        "n_layer": N_LAYERS,
        "n_head": HEADS,
        "n_inner": MLP_WIDTH,
        "rotary_dim": 4,
    },
    "gpt_neox": {
        "hidden_size": HIDDEN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": MLP_WIDTH,
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "opt": {
        "hidden_size": HIDDEN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": HEADS,
        "ffn_dim": MLP_WIDTH,
        "word_embed_proj_dim": HIDDEN,
    },
    "phi": {
        "hidden_size": HIDDEN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": MLP_WIDTH,
    },
}

REQUEST = kedit.EditRequest(prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `TEXT`, with `<|endoftext|>` (id 0) as eos and pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    assert len(wrapped) <= VOCAB and wrapped.eos_token_id == 0
    return wrapped


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised model of `family`, small enough to build in milliseconds."""
    kwargs = {
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "n_positions": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        **CONFIGS[family],
        **overrides,
    }
    if family == "gpt2" or family == "gptj":
        kwargs.pop("max_position_embeddings")
    else:
        kwargs.pop("n_positions")
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()


def tiny_lm(family: str, seed: int = 0, **overrides: Any) -> LM:
    return LM(tiny_model(family, seed, **overrides), tiny_tokenizer(), name=f"tiny-{family}")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices: threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def in_out(module: nn.Module, conv1d: bool) -> tuple[int, int]:
    """Input and output width of a projection, checking its storage orientation."""
    if conv1d:
        assert isinstance(module, Conv1D), type(module)
        fan_in, fan_out = module.weight.shape  # Conv1D stores (in, out)
    else:
        assert isinstance(module, nn.Linear) and not isinstance(module, Conv1D), type(module)
        fan_out, fan_in = module.weight.shape  # nn.Linear stores (out, in)
        assert (fan_in, fan_out) == (module.in_features, module.out_features)
    return fan_in, fan_out


def test_every_family_has_a_tiny_model_config() -> None:
    assert set(CONFIGS) == set(FAMILIES)


def test_tokenizer_covers_the_request(tokenizer: PreTrainedTokenizerFast) -> None:
    lm_text = REQUEST.text + REQUEST.target_new
    ids = tokenizer(lm_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == lm_text
    assert max(ids) < VOCAB
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layout_paths_have_their_roles(family: str) -> None:
    lm = tiny_lm(family)
    model, layout = lm.model, lm.layout
    assert layout == FAMILIES[family] and layout.family == family
    assert layout.n_layers(model) == lm.n_layers == N_LAYERS
    blocks = model.get_submodule(layout.blocks)
    assert isinstance(blocks, nn.ModuleList)
    for layer in range(N_LAYERS):
        assert model.get_submodule(layout.block(layer)) is blocks[layer]
        assert in_out(model.get_submodule(layout.mlp_out_name(layer)), layout.conv1d) == (
            MLP_WIDTH,
            HIDDEN,
        )
        mlp_out_weight = model.get_parameter(f"{layout.mlp_out_name(layer)}.weight")
        assert layout.in_out(mlp_out_weight) == (MLP_WIDTH, HIDDEN)
        assert in_out(model.get_submodule(layout.mlp_in_name(layer)), layout.conv1d)[1] in (
            MLP_WIDTH,
            2 * MLP_WIDTH,  # fused gate and up projections
        )
        assert in_out(model.get_submodule(layout.attn_out_name(layer)), layout.conv1d) == (
            HIDDEN,
            HIDDEN,
        )
        attn = model.get_submodule(layout.attn_name(layer))
        assert layout.attn_out.startswith(layout.attn + ".")
        assert dict(attn.named_modules())[layout.attn_out[len(layout.attn) + 1 :]] is (
            model.get_submodule(layout.attn_out_name(layer))
        )
        mlp = model.get_submodule(layout.mlp_name(layer))
        assert mlp is model.get_submodule(layout.mlp_out_name(layer)) or any(
            sub is model.get_submodule(layout.mlp_out_name(layer)) for sub in mlp.modules()
        )
    norm = model.get_submodule(layout.final_norm)
    assert "norm" in type(norm).__name__.lower(), type(norm)
    assert tuple(norm.weight.shape) == (HIDDEN,)
    unembed = model.get_submodule(layout.unembed)
    assert in_out(unembed, conv1d=False) == (HIDDEN, VOCAB)
    assert unembed is model.get_output_embeddings()
    embed = model.get_submodule(layout.embed)
    assert isinstance(embed, nn.Embedding) and tuple(embed.weight.shape) == (VOCAB, HIDDEN)
    assert embed is model.get_input_embeddings()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_final_norm_and_unembed_produce_the_logits(family: str) -> None:
    """Logits = unembed(final_norm(output of the last block)): the roles are the real ones."""
    lm = tiny_lm(family)
    model, layout = lm.model, lm.layout
    ids, mask = lm.pad([lm.encode(REQUEST.text)])
    last = layout.block(N_LAYERS - 1)
    with capture(model, [last]) as out, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        again = model.get_submodule(layout.unembed)(
            model.get_submodule(layout.final_norm)(out[last])
        )
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=1e-4)


def test_unsupported_model_type_lists_the_supported_families(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    model = nn.Linear(2, 2)
    model.config = SimpleNamespace(model_type="bloom")
    for build in (lambda: layout_for(model), lambda: LM(model, tokenizer)):
        with pytest.raises(UnsupportedArchitectureError) as info:
            build()
        message = str(info.value)
        assert "'bloom'" in message
        for family in FAMILIES:
            assert family in message
    assert issubclass(UnsupportedArchitectureError, ValueError)


def test_model_without_config_is_unsupported() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="None"):
        layout_for(nn.Linear(2, 2))


def test_model_that_does_not_match_its_layout_is_unsupported() -> None:
    model = tiny_model("gpt2")
    model.config.model_type = "llama"  # a GPT-2 module tree claiming to be LLaMA
    with pytest.raises(UnsupportedArchitectureError, match="model.layers"):
        layout_for(model)


def test_renamed_output_embeddings_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-NeoX's unembedding was `embed_out` before transformers 5; either name works."""
    old = dataclasses.replace(FAMILIES["gpt_neox"], unembed="embed_out")
    monkeypatch.setitem(FAMILIES, "gpt_neox", old)
    model = tiny_model("gpt_neox")
    layout = layout_for(model)
    assert model.get_submodule(layout.unembed) is model.get_output_embeddings()
    assert dataclasses.replace(layout, unembed="embed_out") == old


def test_layout_names_are_composed_from_block_paths() -> None:
    layout = Layout(
        family="x",
        blocks="m.blocks",
        mlp_in="ff.a",
        mlp_out="ff.b",
        attn="att",
        attn_out="att.o",
        final_norm="m.norm",
        unembed="head",
        embed="m.emb",
        mlp=None,
    )
    assert layout.block(2) == "m.blocks.2"
    assert layout.mlp_out_name(2) == "m.blocks.2.ff.b"
    assert layout.mlp_in_name(2) == "m.blocks.2.ff.a"
    assert layout.attn_name(2) == "m.blocks.2.att"
    assert layout.attn_out_name(2) == "m.blocks.2.att.o"
    assert layout.mlp_name(2) == layout.mlp_out_name(2)


def test_encoding_is_the_tokenizers_and_follows_added_tokens() -> None:
    lm = LM(tiny_model("gpt2"), copy.deepcopy(tiny_tokenizer()))  # its own: tokens are added
    texts = ["Mira Olsen lives in", " Oslo", "Mira Olsen lives in"]
    plain = tiny_tokenizer()(texts, add_special_tokens=False)["input_ids"]
    assert lm.encode_many(texts) == plain
    assert [lm.encode(text) for text in texts] == plain
    lm.encode(texts[0]).append(-1)  # a caller's change stays its own
    assert lm.encode(texts[0]) == plain[0]
    lm.tokenizer.add_tokens(["Mira Olsen"])
    assert lm.encode(texts[0]) == lm.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert lm.encode(texts[0]) != plain[0]
    lm.tokenizer = copy.deepcopy(tiny_tokenizer())  # another tokenizer, without the token
    assert lm.encode(texts[0]) == plain[0]


def test_model_fingerprint_is_stable_and_sees_one_weight(tmp_path) -> None:
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    first = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    second = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model_fingerprint(first) == model_fingerprint(second) == model_fingerprint(model)
    assert LM(first, tiny_tokenizer()).fingerprint == model_fingerprint(second)
    with torch.no_grad():
        second.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(first) != model_fingerprint(second)
    assert model_fingerprint(tiny_model("llama", seed=1)) != model_fingerprint(first)


def test_sampled_fingerprint_of_large_models_still_sees_a_change(monkeypatch) -> None:
    monkeypatch.setattr(kedit.lm, "FULL_HASH_LIMIT_BYTES", 1)
    first, second = tiny_model("gpt2"), tiny_model("gpt2")
    assert model_fingerprint(first) == model_fingerprint(second)
    with torch.no_grad():
        second.transformer.h[1].mlp.c_proj.weight[0, 0] += 1.0  # index 0 is always sampled
    assert model_fingerprint(first) != model_fingerprint(second)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == saved.keys()
    changed = [name for name in saved if not torch.equal(now[name], saved[name])]
    assert not changed, changed


EDITS = {
    "r-rome": {
        "layers": [1],
        "v_steps": 3,
        "mom2_adjustment": False,
        "prefix_lengths": [[3, 2]],
    },
    "ft-m": {"layers": [1], "steps": 3},
}


@pytest.mark.parametrize("method", sorted(EDITS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_edit_runs_and_undoes_bit_exactly(family: str, method: str) -> None:
    lm = tiny_lm(family)
    before = _state(lm.model)
    edit = kedit.edit(lm, REQUEST, method=method, hparams=EDITS[method])
    assert edit.applied and edit.deltas
    param = f"{lm.layout.mlp_out_name(1)}.weight"
    assert {delta.param for delta in edit.deltas} == {param}
    for delta in edit.deltas:
        assert delta.is_finite()
        assert delta.tensor().shape == lm.model.get_parameter(param).shape
        assert delta.tensor().abs().max() > 0
    if method == "r-rome":
        assert edit.deltas[0].rank == 1
    changed = lm.model.get_parameter(param)
    assert not torch.equal(changed, before[param])
    assert torch.isfinite(changed).all()
    edit.undo()
    _assert_same_state(lm.model, before)
    assert all(p.requires_grad for p in lm.model.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_value_optimisation_with_cached_context_matches_plain_forward_passes(family: str) -> None:
    """The value optimisation runs the positions before the subject once, as a KV cache, and
    many requests in one padded batch: its unedited target NLL must be what plain forward
    passes of the whole rows give, and a batch must find what each request finds alone."""
    from kedit.methods._locate import optimize_values
    from kedit.methods.registry import resolve_hparams

    lm = tiny_lm(family)
    requests = [
        REQUEST,
        kedit.EditRequest(prompt="The city of {} is", subject="Tomas Berg", target_new=" in Porto"),
    ]
    prefixes = ["", "Ana Costa works as a teacher. ", "Oslo. "]
    site = lm.layout.mlp_out_name(1)
    still = resolve_hparams("r-rome", lm, {"layers": [1], "v_stop_nll": 1e9})
    for request, found in zip(
        requests, optimize_values(lm, requests, 1, prefixes, still, [site]), strict=True
    ):
        target = lm.encode(request.target_new)
        nlls = []
        for prefix in prefixes:
            prompt = lm.encode_prompt(prefix + request.text)
            ids = torch.tensor([prompt + target[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
            rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
            nlls.append(-logp[rows, torch.tensor(target)].mean())
        assert found[0].steps == 0
        assert found[0].target_nll == pytest.approx(float(torch.stack(nlls).mean()), rel=1e-4)

    moving = resolve_hparams("r-rome", lm, {"layers": [1], "v_steps": 3, "v_stop_nll": 0.0})
    together = optimize_values(lm, requests, 1, prefixes, moving, [site])
    for request, batched in zip(requests, together, strict=True):
        alone = optimize_values(lm, [request], 1, prefixes, moving, [site])[0][0]
        assert torch.allclose(batched[0].delta, alone.delta, atol=1e-4, rtol=1e-3)
        assert batched[0].delta.norm() > 0
