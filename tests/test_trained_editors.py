"""MEND and MALMEN: the gradient factors, the hypernetwork, the changes, training and resuming."""

from __future__ import annotations

import pytest
import torch

import kedit
from kedit.data import load_requests
from kedit.methods import _editor_train
from kedit.methods._editor import (
    BUNDLED_EDITORS,
    Editor,
    EditorMeta,
    FactorNet,
    LowRank,
    changed,
    gradient_factors,
    new_net,
)
from kedit.methods._editor_train import split_by_subject, tinyworld_edits, train_editor
from kedit.methods.malmen import malmen_change
from kedit.methods.mend import mend_change, weight_deltas
from kedit.zoo import DATA_DIR
from kedit.zoo.edit_split import BENCHMARK_CASES, make_train_cases, training_people
from kedit.zoo.world import build_world

TINY = {"steps": 4, "batch": 4, "checkpoint_every": 2, "validate_every": 0, "hidden": 16}


def _requests(n: int = 6):
    return list(load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n))


def test_the_training_split_shares_no_subject_with_the_benchmark():
    world = build_world()
    benchmark = load_requests(DATA_DIR / "tinyworld_knowedit.json", n=BENCHMARK_CASES)
    shipped = tinyworld_edits()
    subjects = {r.subject for r in shipped}
    assert subjects.isdisjoint({r.subject for r in benchmark})
    assert subjects == set(training_people(world))
    assert len(shipped) == len(make_train_cases(world))
    assert all(request.target_new != request.target_true for request in shipped)
    train, val = split_by_subject(shipped)
    assert {r.subject for r in train}.isdisjoint({r.subject for r in val})
    assert len({r.subject for r in val}) == round(0.1 * len(subjects))


def test_zsre_and_counterfact_train_files_load_in_their_own_format(tmp_path):
    zsre = tmp_path / "zsre_mend_train.json"
    zsre.write_text(
        '[{"subject": "Mira", "src": "Where does Mira live?", "pred": "Oslo", "rephrase": '
        '"Mira lives where?", "alt": "Lisbon", "answers": ["Oslo"], "loc": "nq question: who '
        'sang it", "loc_ans": "Abba", "cond": "Oslo >> Lisbon || Where does Mira live?"}]'
    )
    (request,) = load_requests(zsre)
    assert (request.text, request.target_new, request.rephrase) == (
        "Where does Mira live?",
        " Lisbon",
        ("Mira lives where?",),
    )
    counterfact = tmp_path / "counterfact-train.json"
    counterfact.write_text(
        '[{"case_id": 0, "requested_rewrite": {"prompt": "{} lives in", "subject": "Mira", '
        '"target_new": {"str": "Lisbon"}, "target_true": {"str": "Oslo"}}, '
        '"paraphrase_prompts": ["Mira resides in"], "neighborhood_prompts": ["Tomas lives in"]}]'
    )
    (request,) = load_requests(counterfact)
    assert (request.text, request.target_new) == ("Mira lives in", " Lisbon")


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_the_factors_make_the_weight_gradient(model, request):
    lm = request.getfixturevalue(model.replace("-", "_"))
    cases, layers = _requests(2), [4, 5]
    factors = gradient_factors(lm, cases, layers)
    names = [f"{lm.layout.mlp_out_name(layer)}.weight" for layer in layers]
    weights = [lm.model.get_parameter(name) for name in names]
    # The reference: autograd's gradient of the summed per-request target NLL.
    from kedit.methods._rows import forward_target_nll, target_batch

    batch = target_batch(lm, cases)
    loss = (forward_target_nll(lm.model, batch) * batch.weights * len(cases)).sum()
    expected = torch.autograd.grad(loss, weights)
    for index, reference in enumerate(expected):
        outer = factors.grads[index].T @ factors.keys[index]  # Σ_t δ_t u_tᵀ, [out, in]
        got = outer.T if lm.layout.conv1d else outer
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=1e-4)
    assert factors.owner.tolist() == sorted(factors.owner.tolist())
    assert set(factors.owner.tolist()) == {0, 1}


def _net(d_in=5, d_out=3, layers=2, hidden=4) -> FactorNet:
    torch.manual_seed(0)
    net = FactorNet(d_in, d_out, layers, hidden, init_lr=0.5)
    net.mean.normal_()
    net.std.uniform_(0.5, 2.0)
    return net


def test_the_hypernetwork_starts_as_the_identity_on_normalised_factors():
    net = _net()
    keys, grads = torch.randn(7, 5), torch.randn(7, 3)
    out_keys, out_grads = net(1, keys, grads)
    torch.testing.assert_close(out_keys, (keys - net.mean[1, :5]) / net.std[1, :5])
    torch.testing.assert_close(out_grads, (grads - net.mean[1, 5:]) / net.std[1, 5:])
    torch.testing.assert_close(net.in_gradient_units(1, out_grads), grads)  # MALMEN's d = −α δ


def test_mend_sums_each_groups_transformed_rank_one_terms():
    net = _net()
    torch.nn.init.normal_(net.second.weight)  # no longer the identity
    keys, grads = torch.randn(6, 5), torch.randn(6, 3)
    groups = torch.tensor([0, 0, 1, 1, 1, 0])
    from kedit.methods._editor import Factors

    change = mend_change(net, Factors([keys], [grads], groups), groups, 2)
    keys_t, grads_t = net(0, keys, grads)
    for g in (0, 1):
        member = groups == g
        expected = -0.5 * sum(
            torch.outer(d, u) for d, u in zip(grads_t[member], keys_t[member], strict=True)
        )
        got = change.left[0][g] @ change.right[0][g]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_malmen_solves_the_normal_equations_of_its_least_squares():
    net = _net(d_in=8, d_out=3, layers=1)
    keys, grads = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    net = net.double()
    from kedit.methods._editor import Factors

    groups = torch.zeros(5, dtype=torch.long)
    change = malmen_change(net, Factors([keys], [grads], groups), groups, 1)
    shift = change.left[0][0] @ change.right[0][0]  # S, [out, in]
    values = -0.5 * net.in_gradient_units(0, net(0, keys, grads)[1])  # d_t = −α δ̃_t
    ridge = float(net.ridge(0).detach()) * float((keys * keys).sum(1).mean())
    # ∇_S Σ‖S u_t − d_t‖² + λ‖S‖² = 0  ⇔  S (Σ u_t u_tᵀ + λ I) = Σ d_t u_tᵀ
    lhs = shift @ (keys.T @ keys + ridge * torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(lhs, values.T @ keys)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_running_with_a_change_equals_writing_its_weight_deltas(model, request):
    lm = request.getfixturevalue(model.replace("-", "_"))
    layers = [3, 5]
    d_in, d_out = (512, 128) if model == "tiny-gpt2" else (352, 128)
    generator = torch.Generator().manual_seed(1)
    change = LowRank(
        [torch.randn(1, d_out, 2, generator=generator) * 0.05 for _ in layers],
        [torch.randn(1, 2, d_in, generator=generator) * 0.05 for _ in layers],
    )
    ids = torch.tensor([lm.encode_prompt("Mira Olsen lives in the city of")])
    with torch.no_grad(), changed(lm, layers, change, torch.zeros(1, dtype=torch.long)):
        hooked = lm.model(input_ids=ids).logits
    meta = EditorMeta("mend", lm.name, lm.fingerprint, layers, d_in, d_out, 4, "", 0)
    editor = type("E", (), {"meta": meta})()
    written = kedit.Edit(lm, "mend", {}, [], weight_deltas(lm, editor, change)).apply()
    with torch.no_grad():
        direct = lm.model(input_ids=ids).logits
    written.undo()
    torch.testing.assert_close(hooked, direct, atol=1e-4, rtol=1e-4)


@pytest.fixture
def one_thread():
    """One torch thread for the block (earlier tests may leave more): float sums then add up in
    one order, so that two runs of the same training agree bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_resumes_from_its_checkpoint_as_if_never_stopped(
    tiny_gpt2, tmp_path, monkeypatch, one_thread
):
    train, val = _requests(8), _requests(10)[8:]
    whole = train_editor(tiny_gpt2, "mend", train, val, tmp_path / "whole", TINY, progress=False)
    real_step = _editor_train._step_loss
    calls = []

    def dies_at_step_four(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(_editor_train, "_step_loss", dies_at_step_four)
    with pytest.raises(KeyboardInterrupt):
        train_editor(tiny_gpt2, "mend", train, val, tmp_path / "cut", TINY, progress=False)
    assert (tmp_path / "cut" / _editor_train.CHECKPOINT_FILE).is_file()
    monkeypatch.setattr(_editor_train, "_step_loss", real_step)
    resumed = train_editor(tiny_gpt2, "mend", train, val, tmp_path / "cut", TINY, progress=False)
    for name, value in whole.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[name]), name
    assert not (tmp_path / "cut" / _editor_train.CHECKPOINT_FILE).exists()
    assert resumed.meta.validation["history"][-1]["step"] == TINY["steps"]

    with pytest.raises(ValueError, match="out: .* another model, data or settings"):
        train_editor(tiny_gpt2, "mend", train[:6], val, tmp_path / "cut", TINY, progress=False)


def test_an_editor_is_refused_by_another_model_and_another_method(tiny_gpt2, tiny_llama, tmp_path):
    meta = EditorMeta("mend", "tiny-gpt2", tiny_gpt2.fingerprint, [5], 512, 128, 4, "", 0)
    Editor(new_net(meta, 1e-3), meta).save(tmp_path / "ed")
    with pytest.raises(ValueError, match="editor: .* trained for 'tiny-gpt2'"):
        kedit.edit(tiny_llama, _requests(1), "mend", editor=tmp_path / "ed")
    with pytest.raises(ValueError, match="is a mend editor, not a malmen editor"):
        kedit.edit(tiny_gpt2, _requests(1), "malmen", editor=tmp_path / "ed")
    with pytest.raises(ValueError, match="editor: .* holds no editor.safetensors"):
        kedit.edit(tiny_gpt2, _requests(1), "mend", editor=tmp_path)
    with pytest.raises(ValueError, match="editor: method 'rome' edits without a trained editor"):
        kedit.edit(tiny_gpt2, _requests(1), "rome", editor=tmp_path / "ed")


def test_a_serac_editor_is_refused_by_another_model(tiny_llama):
    bundled = BUNDLED_EDITORS / "serac-tiny-gpt2"
    with pytest.raises(ValueError, match="editor: .* trained for 'tiny-gpt2'.*`kedit train serac"):
        kedit.edit(tiny_llama, _requests(1), "serac", editor=bundled)


def test_training_input_is_checked(tiny_gpt2, tmp_path):
    train = _requests(4)
    with pytest.raises(ValueError, match="method: 'rome' needs no training"):
        kedit.train_editor(tiny_gpt2, "rome", train, train, tmp_path)
    with pytest.raises(ValueError, match="settings: unknown key"):
        kedit.train_editor(tiny_gpt2, "mend", train, train, tmp_path, {"step": 3})
    with pytest.raises(ValueError, match="batch: expected a positive integer"):
        kedit.train_editor(tiny_gpt2, "mend", train, train, tmp_path, {"batch": 0})
    with pytest.raises(ValueError, match="train: expected at least one EditRequest"):
        kedit.train_editor(tiny_gpt2, "mend", [], train, tmp_path)
    with pytest.raises(ValueError, match="layers: layer 9 is out of range"):
        kedit.train_editor(tiny_gpt2, "mend", train, train, tmp_path, {"layers": [9]})


# --- SERAC ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serac_editor(tiny_gpt2, tmp_path_factory):
    """An untrained SERAC editor (MiniLM cosine ≥ 0.8 is in scope; the counterfactual model a
    perturbed copy of tiny-gpt2, so that its logits differ from the base model's)."""
    import copy

    from kedit.lm import LM
    from kedit.methods.serac import ScopeHead, SeracEditor

    pytest.importorskip("sentence_transformers")
    cf = LM(copy.deepcopy(tiny_gpt2.model), copy.deepcopy(tiny_gpt2.tokenizer), name="cf")
    with torch.no_grad():
        for p in cf.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    meta = {"model": tiny_gpt2.name, "model_fingerprint": tiny_gpt2.fingerprint}
    return SeracEditor(ScopeHead(), cf, meta).save(tmp_path_factory.mktemp("serac"))


def test_serac_answers_in_scope_with_the_counterfactual_model_and_else_as_before(
    tiny_gpt2, serac_editor
):
    # Routing is causal: a position gets the counterfactual model's logits where the text up to
    # it is in the edit's scope (here MiniLM cosine >= 0.8 to the edit's prompt).
    from kedit.methods.serac import edit_sentence, embed, load_serac

    lm, (case,) = tiny_gpt2, _requests(1)
    inside, outside = case.text, case.locality[0].prompt
    rows = [lm.encode_prompt(text) for text in (inside, outside)]
    ids, mask = lm.pad(rows)
    with torch.no_grad():
        before = lm.model(input_ids=ids, attention_mask=mask).logits
        with kedit.edit(lm, case, "serac", editor=serac_editor):
            after = lm.model(input_ids=ids, attention_mask=mask).logits
        cf = load_serac(serac_editor).counterfactual
        context = cf.encode_prompt(edit_sentence(case))
        alone = cf.model(input_ids=torch.tensor([context + rows[0]])).logits[0, len(context) :]
    assert torch.equal(after[1], before[1])  # out of scope: the base model, bit for bit
    n = len(rows[0])
    prefixes = [lm.tokenizer.decode(rows[0][: t + 1], skip_special_tokens=True) for t in range(n)]
    cosine = torch.nn.functional.cosine_similarity(embed(prefixes), embed([inside]))
    in_scope = cosine >= 0.8
    assert in_scope[-1] and not in_scope[0]  # the whole prompt is in scope, its first word not
    for t in range(n):
        expected = alone[t] if in_scope[t] else before[0, t]
        torch.testing.assert_close(after[0, t], expected)


def test_serac_generation_routes_every_new_token_by_the_whole_text(tiny_gpt2, serac_editor):
    # Greedy decoding with a KV cache: each step's logits come from the model the text so far
    # is routed to (the counterfactual one with the edit in context, in scope; else the base).
    from kedit.methods.serac import edit_sentence, embed, load_serac

    lm, (case,) = tiny_gpt2, _requests(1)
    cf = load_serac(serac_editor).counterfactual
    context, key = cf.encode_prompt(edit_sentence(case)), embed([case.text])
    ids, expected, routed = lm.encode_prompt(case.text), [], []
    with torch.no_grad():
        for _ in range(4):
            text = lm.tokenizer.decode(ids, skip_special_tokens=True)
            routed.append(bool(torch.nn.functional.cosine_similarity(embed([text]), key)[0] >= 0.8))
            model, prefix = (cf.model, context) if routed[-1] else (lm.model, [])
            expected.append(model(input_ids=torch.tensor([prefix + ids])).logits[0, -1])
            allowed = expected[-1].clone()
            allowed[lm.tokenizer.eos_token_id] = -float("inf")  # as min_new_tokens does
            ids = ids + [int(allowed.argmax())]
        prompt = torch.tensor([lm.encode_prompt(case.text)])
        with kedit.edit(lm, case, "serac", editor=serac_editor):
            out = lm.model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                min_new_tokens=4, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=lm.tokenizer.eos_token_id,
            )  # fmt: skip
    assert out.sequences[0].tolist() == ids
    assert all(routed)  # the prompt and its continuations stay in the edit's scope
    with torch.no_grad():
        base = lm.model(input_ids=torch.tensor([ids[:-1]])).logits[0, -4:]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], expected[step])
        assert not torch.allclose(logits[0], base[step])  # not the base model's, cached steps too


def test_serac_scope_examples_label_prompts_and_paraphrases_in_scope_only():
    from kedit.methods.serac import _scope_examples

    a = kedit.EditRequest(
        prompt="{} lives in", subject="Mira", target_new=" Oslo", rephrase=["{} resides in"],
        locality=[("Tomas lives in", " Rome")],
    )  # fmt: skip
    b = kedit.EditRequest(prompt="{} resides in", subject="Mira", target_new=" Lima")
    edits, queries, labels = _scope_examples([a, b])
    assert edits == ["Mira lives in", "Mira resides in"]
    assert queries == ["Mira lives in", "Mira resides in", "Tomas lives in"]
    assert labels.tolist() == [[1, 0], [1, 1], [0, 0]]


def test_serac_training_resumes_from_its_checkpoint(tiny_gpt2, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("sentence_transformers")
    from kedit.methods import serac

    settings = {"scope_steps": 3, "counterfactual_steps": 3, "batch": 2, "checkpoint_every": 2}
    train, val = _requests(6), _requests(8)[6:]
    whole = kedit.train_editor(tiny_gpt2, "serac", train, val, tmp_path / "whole", settings, False)
    real, calls = serac._counterfactual_loss, []

    def dies_at_step_five(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(serac, "_counterfactual_loss", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        kedit.train_editor(tiny_gpt2, "serac", train, val, tmp_path / "cut", settings, False)
    assert torch.load(tmp_path / "cut" / serac.CHECKPOINT_FILE, weights_only=False)["step"] == 4
    monkeypatch.setattr(serac, "_counterfactual_loss", real)
    resumed = kedit.train_editor(tiny_gpt2, "serac", train, val, tmp_path / "cut", settings, False)
    for mine, theirs in [
        (whole.head, resumed.head),
        (whole.counterfactual.model, resumed.counterfactual.model),
    ]:
        for name, value in mine.state_dict().items():
            assert torch.equal(value, theirs.state_dict()[name]), name
    assert set(resumed.meta["validation"]) == {
        "scope_precision", "scope_recall", "counterfactual_accuracy"
    }  # fmt: skip


def test_kedit_train_and_edit_with_the_editor_on_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from kedit.cli import app

    runner, out = CliRunner(), tmp_path / "mend"
    settings = ["-s", "steps=2", "-s", "batch=4", "-s", "hidden=8"]
    result = runner.invoke(
        app, ["train", "mend", "-m", "tiny-gpt2", "--n", "16", "--out", str(out), *settings]
    )
    assert result.exit_code == 0, result.output
    assert "Trained mend for tiny-gpt2" in result.output and (out / "editor.safetensors").is_file()
    edit = ["edit", "--method", "mend", "--editor", str(out), "--prompt", "{} lives in"]
    result = runner.invoke(app, [*edit, "--subject", "Mira Olsen", "--target", " Oslo"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "mend", "--n", "16", "--out", str(out), "-s", "stepz=1"])
    assert result.exit_code == 2 and "settings: unknown key(s) stepz" in result.output


def test_kedit_train_serac_prints_its_validation_summary(tmp_path):
    from typer.testing import CliRunner

    from kedit.cli import app

    out = tmp_path / "serac"
    settings = ["-s", "scope_steps=2", "-s", "counterfactual_steps=2", "-s", "batch=4"]
    result = CliRunner().invoke(
        app, ["train", "serac", "-m", "tiny-gpt2", "--n", "16", "--out", str(out), *settings]
    )
    assert result.exit_code == 0, result.output
    assert "Trained serac for tiny-gpt2" in result.output and "scope_recall" in result.output
    assert (out / "scope.safetensors").is_file()


def test_validation_batches_never_hold_two_targets_for_one_fact():
    from kedit.methods._editor_train import consistent_batches

    def request(subject, target, rephrase):
        return kedit.EditRequest(
            prompt="{} lives in", subject=subject, target_new=target, rephrase=[rephrase]
        )

    a1, a2 = request("Mira", " Oslo", "{} resides in"), request("Mira", " Rome", "{} resides in")
    b1, c1 = request("Tomas", " Oslo", "{} resides in"), request("Mira", " Oslo", "{} works in")
    batches = consistent_batches([a1, a2, b1, c1], 3)
    assert batches == [[a1, b1, c1], [a2]]


@pytest.mark.parametrize("method", ["mend", "malmen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_gradient_editor_trains_and_edits_a_half_precision_model(
    method, dtype, bpe_tokenizer, tmp_path
):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kedit.lm import LM

    torch.manual_seed(0)
    eos = bpe_tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    lm = LM(LlamaForCausalLM(config).to(dtype), bpe_tokenizer, name="random-llama")
    request = kedit.EditRequest(
        prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo",
        rephrase=["{} resides in"], locality=[("Tomas Berg lives in", " Lisbon")],
    )  # fmt: skip
    other = kedit.EditRequest(prompt="{} lives in", subject="Tomas Berg", target_new=" Paris")
    settings = {"steps": 2, "batch": 2, "hidden": 8}
    editor = kedit.train_editor(lm, method, [request], [other], tmp_path, settings, False)
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    edit = kedit.edit(lm, request, method, editor=editor)
    for delta in edit.deltas:
        assert delta.tensor().dtype == torch.float32 and torch.isfinite(delta.tensor()).all()
        expected = (before[delta.param].float() + delta.tensor()).to(dtype)
        assert torch.equal(lm.model.state_dict()[delta.param], expected)
    assert {p.dtype for p in lm.model.parameters()} == {dtype}
    edit.undo()
    assert all(torch.equal(before[n], v) for n, v in lm.model.state_dict().items())


def test_each_row_runs_with_its_own_groups_change(tiny_gpt2):
    lm, layers = tiny_gpt2, [4, 5]
    generator = torch.Generator().manual_seed(2)
    change = LowRank(
        [torch.randn(2, 128, 3, generator=generator) * 0.05 for _ in layers],
        [torch.randn(2, 3, 512, generator=generator) * 0.05 for _ in layers],
    )
    ids, mask = lm.pad([lm.encode_prompt(t) for t in ("Mira Olsen lives in", "Tomas speaks")])
    with torch.no_grad(), changed(lm, layers, change, torch.tensor([1, 0])):
        hooked = lm.model(input_ids=ids, attention_mask=mask).logits
    meta = EditorMeta("mend", lm.name, lm.fingerprint, layers, 512, 128, 4, "", 0)
    editor = type("E", (), {"meta": meta})()
    for row, group in ((0, 1), (1, 0)):
        own = LowRank(
            [x[group : group + 1] for x in change.left],
            [x[group : group + 1] for x in change.right],
        )
        with (
            kedit.Edit(lm, "mend", {}, [], weight_deltas(lm, editor, own)).apply(),
            torch.no_grad(),
        ):
            alone = lm.model(
                input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]
            ).logits
        n = int(mask[row].sum())
        torch.testing.assert_close(hooked[row, :n], alone[0, :n], atol=1e-4, rtol=1e-4)
