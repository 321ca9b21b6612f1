import torch

import kedit
from kedit.eval.runner import summarize
from kedit.methods._locate import mlp_out_param
from kedit.methods.registry import resolve_hparams


def _requests(n, start=0):
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    return load_requests(benchmark_path("knowedit"), n=start + n)[start:]


def test_pmet_batch_edit_reaches_its_targets(tiny_gpt2):
    # Cases whose joint value optimisation converges; over the first 20 tinyworld cases in one
    # batch PMET reaches reliability 0.80 at locality 0.80 (see the report in pmet.yaml).
    lm = tiny_gpt2
    requests = _requests(4, start=16)
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    with kedit.edit(lm, requests, method="pmet") as edit:
        scores = kedit.evaluate(lm, requests, edit=edit, contexts=0)
    post = summarize(scores)["post"]["teacher_forced"]
    assert post["reliability"] >= 0.75
    assert post["locality"] >= 0.8
    assert all(torch.equal(before[n], v) for n, v in lm.model.state_dict().items())


def test_pmet_batch_edit_on_llama(tiny_llama):
    requests = _requests(10)
    with kedit.edit(tiny_llama, requests, method="pmet") as edit:
        assert [d.param for d in edit.deltas] == [
            mlp_out_param(tiny_llama, layer) for layer in resolve_hparams("pmet", tiny_llama).layers
        ]
        scores = kedit.evaluate(tiny_llama, requests, edit=edit, contexts=0)
    post = summarize(scores)["post"]["teacher_forced"]
    assert post["reliability"] >= 0.75  # measured 0.8 (case 9 is missed; see pmet.yaml)
    assert post["locality"] >= 0.9  # measured 1.0
