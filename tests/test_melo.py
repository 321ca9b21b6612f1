import pytest
import torch

import kedit
from kedit.edits import attached
from kedit.hooks import capture
from kedit.methods._train import request_row
from kedit.methods.grace import label_of
from kedit.methods.melo import LoRABlocks
from kedit.requests import EditRequest

PATH = "transformer.h.5.mlp.c_proj"


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n)


def test_a_covered_token_adds_its_keys_block_and_the_others_pass_through():
    memory = LoRABlocks({"scale": 2.0})
    buffers = {
        "keys": torch.tensor([[0.0, 0.0], [4.0, 0.0]]),
        "radii": torch.tensor([1.0, 2.0]),
        "blocks": torch.tensor([1, 0]),
        "down": torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]]),  # block 0: x_0, block 1: x_1
        "up": torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]]),
    }
    for name, value in buffers.items():
        memory.set_buffer(name, value)
    inputs = torch.tensor([[0.5, 0.5], [3.0, 0.0], [1.5, 0.0]])
    output = torch.ones(3, 2)
    # [0.5, 0.5]: key 0 at 0.71 < 1, block 1: 2 * 0.5 * [0, 3] = [0, 3];
    # [3, 0]: key 1 at 1 < 2, block 0: 2 * 3 * [1, 0] = [6, 0]; [1.5, 0]: 1.5 > 1, unchanged.
    expected = torch.tensor([[1.0, 4.0], [7.0, 1.0], [1.0, 1.0]])
    assert torch.equal(memory.adapt(inputs, output), expected)


def _inputs(lm, ids):
    with torch.no_grad(), capture(lm.model, [PATH], "input") as seen:
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0]
    return seen[PATH][0].float(), logits


def test_an_edit_keys_its_target_positions_to_a_new_block_and_leaves_far_prompts(tiny_gpt2):
    lm = tiny_gpt2
    request = _requests(1)[0]
    ids, positions, targets = request_row(lm, request)
    far = lm.encode_prompt(request.locality[0].prompt)
    before_far = _inputs(lm, far)[1]
    with kedit.edit(lm, request, "melo", {"layers": [5], "eps_init": 3.0}) as edit:
        (memory,) = attached(lm.model.get_submodule(PATH))
        assert edit.info["rule"] == "add" and edit.info["block"] == 0
        inputs, logits = _inputs(lm, ids)
        assert torch.allclose(memory.keys, inputs[positions], atol=1e-6)
        assert memory.radii.tolist() == [3.0] * len(positions)
        assert memory.blocks.tolist() == [0] * len(positions)
        assert memory.labels.tolist() == [label_of(request)] * len(positions)
        assert logits[positions].argmax(-1).tolist() == targets
        far_inputs, far_logits = _inputs(lm, far)
        assert bool((torch.cdist(far_inputs, memory.keys) > 3.0).all())
        assert torch.equal(far_logits, before_far)


def test_the_database_expands_and_splits_by_graces_rules(tiny_gpt2):
    lm = tiny_gpt2
    first = _requests(1)[0]
    paraphrase = first.rephrase[0]
    key = _inputs(lm, lm.encode_prompt(first.text))[0][-1]
    distance = float((_inputs(lm, lm.encode_prompt(paraphrase))[0][-1] - key).norm())
    eps = 0.6 * distance  # the paraphrase lies between ε and ε + ε_init of the first key
    params = {"layers": [5], "eps_init": eps}
    with kedit.edit(lm, first, "melo", params):
        (memory,) = attached(lm.model.get_submodule(PATH))
        keys = memory.rows("keys")
        same = EditRequest(prompt=paraphrase, subject=first.subject, target_new=first.target_new)
        with kedit.edit(lm, same, "melo", params) as expanded:
            assert expanded.info["rule"] == "expand" and expanded.info["block"] == 0
            assert memory.rows("down") == 1 and memory.blocks.tolist() == [0] * memory.rows("keys")
            assert float(memory.radii[0]) == pytest.approx(distance, rel=1e-4)
        other = EditRequest(prompt=paraphrase, subject=first.subject, target_new=" Oslo")
        with kedit.edit(lm, other, "melo", params) as split:
            assert split.info["rule"] == "split" and split.info["block"] == 1
            assert memory.rows("down") == 2 and memory.blocks[keys:].tolist() == [1] * (
                memory.rows("keys") - keys
            )
            assert float(memory.radii[0]) == pytest.approx(distance / 2, rel=1e-4)
            assert float(memory.radii[-1]) == pytest.approx(distance / 2, rel=1e-4)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"layers": [4, 5]}, "layers: MELO's key database sits at one layer"),
        ({"rank": 0}, "rank: expected a positive integer, got 0"),
        ({"eps_init": -1.0}, "eps_init: expected a positive number, got -1.0"),
    ],
)
def test_melo_hparams_are_checked(tiny_gpt2, values, message):
    with pytest.raises(ValueError, match=message):
        kedit.edit(tiny_gpt2, _requests(1), "melo", values)
