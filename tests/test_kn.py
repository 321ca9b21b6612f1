import pytest
import torch

import kedit
from kedit.hooks import replace_input
from kedit.methods.kn import KNHyperParams, knowledge_neurons, neuron_attributions
from kedit.methods.registry import resolve_hparams
from kedit.requests import EditRequest

PROMPT, ANSWER = "Tomas Berg lives in", " Oslo"


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    return load_requests(benchmark_path("knowedit"), n=n)


def _probability(lm, prompt, token):
    ids = torch.tensor([lm.encode_prompt(prompt)])
    with torch.no_grad():
        return torch.softmax(lm.model(input_ids=ids).logits[0, -1].double(), dim=-1)[token]


def test_attribution_finds_a_planted_neuron(random_gpt2):
    lm, layer, neuron = random_gpt2, 1, 37
    (answer,) = lm.encode(ANSWER)
    mlp = lm.model.get_submodule(lm.layout.mlp_name(layer))
    with torch.no_grad():
        # The neuron always fires (input side), and its value vector writes the answer's
        # embedding (output side; GPT-2 stores weights (in, out), so the value is a row).
        lm.model.get_submodule(lm.layout.embed).weight[answer] *= 20
        mlp.c_fc.bias[neuron] = 4.0
        value = lm.model.get_submodule(lm.layout.embed).weight[answer]
        mlp.c_proj.weight[neuron] = 10 * value / value.norm()
    assert _probability(lm, PROMPT, answer) > 0.9
    scores = neuron_attributions(lm, PROMPT, ANSWER, steps=8)
    assert scores.shape == (2, 4 * 32)
    top = int(scores.flatten().argmax())
    assert divmod(top, scores.shape[1]) == (layer, neuron)
    params = KNHyperParams(layers=[0, 1], steps=8)
    assert knowledge_neurons(lm, [PROMPT], ANSWER, params) == [(layer, neuron)]


def test_attributions_sum_to_the_probability_change_of_zeroing_the_layer(random_gpt2):
    # Integrated gradients are complete: along 0 -> w̄, the attributions of a layer's neurons
    # add up to P(answer | w̄) - P(answer | 0) (the Riemann sum converges to it).
    lm = random_gpt2
    (answer,) = lm.encode(ANSWER)
    scores = neuron_attributions(lm, PROMPT, ANSWER, layers=[1, 0], steps=64).double()
    full = _probability(lm, PROMPT, answer)

    def zero_last(value):
        value = value.clone()
        value[:, -1] = 0
        return value

    for row, layer in enumerate([1, 0]):
        with replace_input(lm.model, lm.layout.mlp_out_name(layer), zero_last):
            change = full - _probability(lm, PROMPT, answer)
        assert abs(scores[row].sum() - change) <= 0.02 * abs(change) + 1e-9


def test_multi_token_answers_average_their_tokens(random_gpt2):
    lm = random_gpt2
    head, tail = " Lisbon", "."
    assert lm.encode(PROMPT + head) == lm.encode(PROMPT) + lm.encode(head)
    both = neuron_attributions(lm, PROMPT, head + tail, steps=4)
    first = neuron_attributions(lm, PROMPT, head, steps=4)
    second = neuron_attributions(lm, PROMPT + head, tail, steps=4)
    assert torch.allclose(both, (first + second) / 2, rtol=1e-4, atol=1e-9)


def test_attribution_input_errors(random_gpt2):
    with pytest.raises(ValueError, match="answer: expected a non-empty string"):
        neuron_attributions(random_gpt2, PROMPT, " ")
    with pytest.raises(ValueError, match="steps: expected a positive integer"):
        neuron_attributions(random_gpt2, PROMPT, ANSWER, steps=0)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        neuron_attributions(random_gpt2, PROMPT, ANSWER, layers=[5])


def test_kn_edit_changes_only_the_located_columns_and_undoes_exactly(tiny_gpt2):
    lm = tiny_gpt2
    requests = _requests(2)
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    with kedit.edit(lm, requests, method="kn", hparams={"layers": [2, 3]}) as edit:
        located = edit.info["neurons"]
        assert all(1 <= len(neurons) <= 5 for neurons in located)
        touched = {}
        for layer, index in (pair for neurons in located for pair in neurons):
            touched.setdefault(f"{lm.layout.mlp_out_name(layer)}.weight", set()).add(index)
        for name, value in lm.model.state_dict().items():
            changed = (value != before[name]).any(dim=1) if value.dim() == 2 else None
            if name not in touched:
                assert torch.equal(value, before[name]), name
            else:  # GPT-2's Conv1D keeps (in, out): a value vector is a row
                assert set(changed.nonzero().flatten().tolist()) == touched[name]
    assert all(torch.equal(before[n], v) for n, v in lm.model.state_dict().items())


def test_kn_moves_each_located_value_vector_by_the_new_minus_the_old_embedding(tiny_gpt2):
    """KN's edit (Dai et al., 2022, §5.1): each located neuron's value vector, its column of the
    MLP output projection (out × in), gains λ₂ e(new) − λ₁ e(old), e the output embedding (the
    unembedding row, KN's default) of the answer's first token, λ₁ = erase_scale and
    λ₂ = update_scale; the embeddings are read here from the model's own unembedding."""
    lm = tiny_gpt2
    request = _requests(1)[0]
    params = resolve_hparams("kn", lm, {"layers": [2, 3]})
    unembedding = lm.model.get_output_embeddings().weight.detach().double()
    new, old = lm.encode(request.target_new)[0], lm.encode(request.target_true)[0]
    expected = params.update_scale * unembedding[new] - params.erase_scale * unembedding[old]
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    with kedit.edit(lm, request, method="kn", hparams=params.to_dict()) as edit:
        (neurons,) = edit.info["neurons"]
        assert neurons
        for layer, index in neurons:
            name = f"{lm.layout.mlp_out_name(layer)}.weight"
            change = (lm.model.get_parameter(name).detach() - before[name]).double()
            change = change.T if lm.layout.conv1d else change  # (out, in)
            assert torch.allclose(change[:, index], expected, atol=1e-5 * expected.norm())


def test_kn_edit_on_llama_changes_value_columns(tiny_llama):
    lm = tiny_llama
    request = _requests(1)[0]
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    with kedit.edit(lm, request, method="kn", hparams={"layers": [2]}) as edit:
        (neurons,) = edit.info["neurons"]
        assert neurons
        name = f"{lm.layout.mlp_out_name(2)}.weight"
        changed = (lm.model.get_parameter(name) != before[name]).any(dim=0)
        assert set(changed.nonzero().flatten().tolist()) == {index for _, index in neurons}
    assert all(torch.equal(before[n], v) for n, v in lm.model.state_dict().items())


def test_kn_needs_target_true_and_checks_hparams(tiny_gpt2):
    request = EditRequest(prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo")
    with pytest.raises(ValueError, match=r"requests\[0\].target_true"):
        kedit.edit(tiny_gpt2, request, method="kn")
    with pytest.raises(ValueError, match="neuron_range: expected"):
        resolve_hparams("kn", tiny_gpt2, {"neuron_range": [3, 1]})
    with pytest.raises(ValueError, match="embedding: expected one of"):
        resolve_hparams("kn", tiny_gpt2, {"embedding": "both"})
    assert resolve_hparams("kn", tiny_gpt2, {"adaptive_threshold": 0.3}).threshold == 0.3
