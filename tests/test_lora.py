import subprocess
import sys

import pytest
import torch

import kedit
from kedit.edits import AdaptorDelta, WeightDelta, attached
from kedit.methods.lora import (
    AdaLoRAHyperParams,
    LoRAHyperParams,
    LowRankAdaptor,
    low_rank_factors,
    orthogonality,
    peft_layers,
)
from kedit.methods.registry import resolve_hparams


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n)


def _state(lm):
    return {name: value.clone() for name, value in lm.model.state_dict().items()}


@pytest.mark.parametrize("hparams_class", [LoRAHyperParams, AdaLoRAHyperParams])
def test_the_adaptor_computes_what_the_trained_peft_layer_computes(tiny_gpt2, hparams_class):
    """peft's own forward pass is the reference: the factors kedit keeps must reproduce it."""
    lm, path = tiny_gpt2, "transformer.h.5.mlp.c_proj"
    host = lm.model.get_submodule(path)
    inputs = torch.randn(2, 3, host.weight.shape[0], generator=torch.Generator().manual_seed(0))
    hparams = hparams_class(layers=[5])
    with peft_layers(lm, [path], hparams) as (_, (layer,)):
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if "lora_" in name:
                    param.copy_(0.1 * torch.randn(param.shape))
            if hparams_class is AdaLoRAHyperParams:
                layer.lora_E["default"][2] = 0.0  # a pruned singular value
            expected = layer(inputs)
        down, up = low_rank_factors(layer)
    assert down.shape[0] == (hparams.rank - 1 if hparams_class is AdaLoRAHyperParams else 8)
    adaptor = LowRankAdaptor({})
    adaptor.set_buffer("down", down)
    adaptor.set_buffer("up", up)
    with torch.no_grad():
        torch.testing.assert_close(adaptor.adapt(inputs, host(inputs)), expected)


def test_orthogonality_is_zero_for_orthonormal_factors_only(tiny_gpt2):
    lm, path = tiny_gpt2, "transformer.h.5.mlp.c_proj"
    with peft_layers(lm, [path], AdaLoRAHyperParams(layers=[5], rank=4)) as (_, (layer,)):
        q, p = layer.lora_A["default"], layer.lora_B["default"]
        with torch.no_grad():
            q.copy_(torch.eye(q.shape[1])[:4])  # orthonormal rows
            p.copy_(torch.eye(p.shape[0])[:, :4])  # orthonormal columns
            assert float(orthogonality([layer])) == 0.0
            q.mul_(2.0)  # QQᵀ = 4 I: ‖4I − I‖²_F = 9 · 4
            assert float(orthogonality([layer])) == pytest.approx(36.0)


def test_an_adaptor_edit_attaches_and_a_merged_one_changes_the_weight_alike(tiny_gpt2):
    lm = tiny_gpt2
    request = _requests(1)[0]
    before = _state(lm)
    ids = torch.tensor([lm.encode_prompt(request.text)])
    with kedit.edit(lm, request, "lora") as adaptor:
        (delta,) = adaptor.deltas
        assert isinstance(delta, AdaptorDelta) and delta.adaptor == "low-rank"
        assert [type(a) for a in attached(lm.model.get_submodule(delta.path))] == [LowRankAdaptor]
        with torch.no_grad():
            adapted = lm.model(input_ids=ids).logits
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    with kedit.edit(lm, request, "lora", {"merge": True}) as merged:
        (delta,) = merged.deltas
        assert isinstance(delta, WeightDelta) and delta.rank == 8
        assert not attached(lm.model.get_submodule(delta.param.removesuffix(".weight")))
        with torch.no_grad():
            folded = lm.model(input_ids=ids).logits
    torch.testing.assert_close(folded, adapted, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_adalora_prunes_towards_the_target_rank(tiny_gpt2):
    params = {"layers": [4, 5], "rank": 6, "target_rank": 3, "steps": 30, "final_steps": 10}
    with kedit.edit(tiny_gpt2, _requests(1), "adalora", params) as edit:
        ranks = list(edit.info["ranks"].values())
    # The budget is the average rank over the adapted modules; each keeps at most its initial.
    assert sum(ranks) == 2 * 3 and all(rank <= 6 for rank in ranks)


def test_peft_is_imported_only_when_an_adaptor_is_trained():
    code = "import sys, kedit; kedit.list_methods(); print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("method", "values", "message"),
    [
        ("lora", {"modules": ["q_proj"]}, "modules: expected some of mlp_in, mlp_out, attn_out"),
        ("lora", {"rank": 0}, "rank: expected a positive integer, got 0"),
        ("lora", {"layers": [9]}, "layers: layer 9 is out of range"),
        ("adalora", {"target_rank": 20}, r"target_rank: expected 1..rank \(12\), got 20"),
        ("adalora", {"steps": 10, "final_steps": 10}, "pruning needs warmup_steps"),
    ],
)
def test_lora_hparams_are_checked(tiny_gpt2, method, values, message):
    with pytest.raises(ValueError, match=message):
        kedit.edit(tiny_gpt2, _requests(1), method, values)


def test_easyedit_lora_keys_are_read(tiny_gpt2):
    params = resolve_hparams("adalora", tiny_gpt2, {"lora_alpha": 16, "init_r": 10, "tinit": 2})
    assert (params.alpha, params.rank, params.warmup_steps) == (16, 10, 2)
