import pytest
import torch

import kedit
from kedit.edits import attached
from kedit.hooks import capture
from kedit.methods.grace import Codebook, label_of
from kedit.requests import EditRequest

LAYER = 5
PATH = f"transformer.h.{LAYER}.mlp.c_proj"


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n)


def _codebook(keys, values, radii):
    book = Codebook({})
    for name, value in {"keys": keys, "values": values, "radii": radii}.items():
        book.set_buffer(name, torch.tensor(value, dtype=torch.float32))
    book.set_buffer("labels", torch.zeros(len(radii), dtype=torch.long))
    return book


def test_inputs_within_a_radius_take_the_nearest_value_and_the_others_pass_through():
    book = _codebook(keys=[[0.0, 0.0], [4.0, 0.0]], values=[[1.0, 1.0], [2.0, 2.0]], radii=[1, 2])
    inputs = torch.tensor([[[0.5, 0.5], [3.0, 0.0], [1.5, 0.0], [0.0, 3.0]]])
    output = torch.tensor([[[9.0, 8.0], [7.0, 6.0], [5.0, 4.0], [3.0, 2.0]]])
    # Distances to the nearest key: 0.71 < 1 (key 0), 1 < 2 (key 1), 1.5 > 1 (key 0), 3 > 1.
    expected = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [5.0, 4.0], [3.0, 2.0]]])
    assert torch.equal(book.adapt(inputs, output), expected)


def _key(lm, prompt):
    ids = lm.encode_prompt(prompt)
    with torch.no_grad(), capture(lm.model, [PATH], "input") as seen:
        lm.model(input_ids=torch.tensor([ids]))
    return seen[PATH][0, -1].float()


@torch.no_grad()
def _predicts(lm, prompt, target):
    """Whether the model's next token after `prompt` is the first token of `target`."""
    ids = torch.tensor([lm.encode_prompt(prompt)])
    return int(lm.model(input_ids=ids).logits[0, -1].argmax()) == lm.encode(target)[0]


def test_add_expand_and_split_follow_the_paper(tiny_gpt2):
    lm = tiny_gpt2
    first = _requests(1)[0]
    paraphrase = first.rephrase[0]
    distance = float((_key(lm, first.text) - _key(lm, paraphrase)).norm())
    eps = 0.6 * distance  # the paraphrase lies between ε and ε + ε_init of the first key
    params = {"layers": [LAYER], "eps_init": eps}
    added = kedit.edit(lm, first, "grace", params)
    (book,) = attached(lm.model.get_submodule(PATH))
    assert added.info["rule"] == "add" and book.rows("keys") == 1
    assert torch.allclose(book.keys[0], _key(lm, first.text).cpu(), atol=1e-5)
    assert book.radii.tolist() == pytest.approx([eps])
    assert _predicts(lm, first.text, first.target_new)

    same = EditRequest(prompt=paraphrase, subject=first.subject, target_new=first.target_new)
    with kedit.edit(lm, same, "grace", params) as expanded:
        assert expanded.info["rule"] == "expand" and book.rows("keys") == 1
        assert book.radii.tolist() == pytest.approx([distance], rel=1e-4)
        again = kedit.edit(lm, same, "grace", params)
        assert again.info["rule"] == "covered" and again.deltas == []
        again.undo()
    assert book.radii.tolist() == pytest.approx([eps])

    other = EditRequest(prompt=paraphrase, subject=first.subject, target_new=" Oslo")
    assert label_of(other) != label_of(first)
    with kedit.edit(lm, other, "grace", params) as split:
        assert split.info["rule"] == "split" and book.rows("keys") == 2
        assert book.radii.tolist() == pytest.approx([distance / 2, distance / 2], rel=1e-4)
        assert book.labels.tolist() == [label_of(first), label_of(other)]
        assert _predicts(lm, paraphrase, " Oslo") and _predicts(lm, first.text, first.target_new)
    added.undo()
    assert not attached(lm.model.get_submodule(PATH))


def test_a_prompt_outside_every_radius_is_untouched_bit_for_bit(tiny_gpt2):
    lm = tiny_gpt2
    requests = _requests(6)
    probe = requests[5].text
    ids = torch.tensor([lm.encode_prompt(probe)])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    with kedit.edit(lm, requests[:5], "grace", {"layers": [LAYER], "eps_init": 3.0}):
        (book,) = attached(lm.model.get_submodule(PATH))
        with torch.no_grad(), capture(lm.model, [PATH], "input") as seen:
            after = lm.model(input_ids=ids).logits
        distances = torch.cdist(seen[PATH][0].float(), book.keys)
        assert bool((distances > book.radii).all()), "the probe must lie outside every radius"
        assert torch.equal(after, before)
        # and the edited prompts do give their targets
        assert all(_predicts(lm, r.text, r.target_new) for r in requests[:5])


def test_grace_hparams_are_checked(tiny_gpt2):
    with pytest.raises(ValueError, match="layers: GRACE's codebook sits at one layer"):
        kedit.edit(tiny_gpt2, _requests(1), "grace", {"layers": [4, 5]})
    with pytest.raises(ValueError, match="eps_init: expected a positive number, got 0.0"):
        kedit.edit(tiny_gpt2, _requests(1), "grace", {"eps_init": 0.0})
