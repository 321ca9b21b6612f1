"""Multi-Label Edit (Li et al., 2024): a request with several targets, taken by the
locate-then-edit value optimisation and by FT, refused by the other methods."""

import math

import pytest

import kedit
from kedit.eval.protocols import score_probability
from kedit.methods._locate import context_prefixes, optimize_values
from kedit.methods.registry import resolve_hparams

PERSON = "Emil Kelley"  # tinyworld: his native language is German


def _request(*extra):
    return kedit.EditRequest(
        prompt="{} speaks", subject=PERSON, target_new=" Greek", extra_targets=extra
    )


def test_extra_targets_are_checked_and_kept():
    request = _request(" Turkish", " Dutch")
    assert request.targets == (" Greek", " Turkish", " Dutch")
    assert kedit.EditRequest.from_dict(request.to_dict()) == request
    assert _request().targets == (" Greek",)
    for bad, field in [
        (" Turkish", "single string"),
        ([" Turkish", ""], r"extra_targets\[1\]"),
        ([" Greek"], "already a target"),
    ]:
        with pytest.raises(ValueError, match=field):
            kedit.EditRequest(
                prompt="{} speaks", subject=PERSON, target_new=" Greek", extra_targets=bad
            )


def test_value_optimisation_loss_averages_the_nll_over_targets_and_prefixes(
    tiny_gpt2, mean_target_nll
):
    lm = tiny_gpt2
    # A stopping threshold no NLL reaches: the result is the unedited model's NLL (step 0).
    hparams = resolve_hparams("rome", lm, {"prefix_lengths": [[4, 2]], "v_stop_nll": 100.0})
    prefixes = context_prefixes(lm, hparams)
    request = _request(" Turkish")
    site = lm.layout.mlp_out_name(hparams.layers[0])
    found = optimize_values(lm, [request], hparams.layers[0], prefixes, hparams, [site])[0][0]
    expected = [mean_target_nll(lm, p + request.text, t) for t in request.targets for p in prefixes]
    assert found.steps == 0
    assert found.target_nll == pytest.approx(sum(expected) / len(expected), abs=1e-4)


@pytest.mark.parametrize("method", ["rome", "ft-m"])
def test_a_multi_label_edit_makes_every_target_likely(tiny_gpt2, method):
    lm = tiny_gpt2
    prompt = f"{PERSON} speaks"
    answers = [" Greek", " Turkish"]

    def probabilities():
        scores = score_probability(lm, [(prompt, answers)])[0]
        return [math.exp(-nll) for nll in scores]

    single = kedit.edit(lm, _request(), method=method)
    greek, turkish = probabilities()
    single.undo()
    assert greek > 0.5 and turkish < 0.01
    multi = kedit.edit(lm, _request(" Turkish"), method=method)
    greek, turkish = probabilities()
    multi.undo()
    # Both labels now share the mass that one of them took alone.
    assert greek > 0.15 and turkish > 0.15 and greek + turkish > 0.8


def test_methods_without_multi_label_refuse_extra_targets(tiny_gpt2):
    request = kedit.EditRequest(
        prompt="{} speaks",
        subject=PERSON,
        target_new=" Greek",
        target_true=" German",
        extra_targets=(" Turkish",),
    )
    with pytest.raises(ValueError, match=r"requests\[0\].extra_targets: method 'kn'"):
        kedit.edit(tiny_gpt2, request, method="kn")
    with pytest.raises(ValueError, match="extra_targets"):
        next(kedit.edit_each(tiny_gpt2, [request], method="kn"))


def test_a_saved_multi_label_edit_keeps_its_targets(tiny_gpt2, tmp_path):
    edit = kedit.edit(tiny_gpt2, _request(" Turkish"), method="ft-m")
    path = edit.save(tmp_path / "mle.kedit")
    edit.undo()
    again = kedit.apply(tiny_gpt2, path)
    assert again.requests[0].extra_targets == (" Turkish",)
    again.undo()
