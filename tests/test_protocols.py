import pytest
import torch

import kedit
from kedit.eval.protocols import (
    PROTOCOLS,
    TokenScore,
    check_protocol,
    greedy_generate,
    sample_continuations,
    score_generation,
    score_probability,
    score_teacher_forced,
    teacher_forced_metrics,
)
from kedit.eval.runner import evaluate, summarize

PAIRS = [
    ("Mira Olsen lives in", " Lisbon"),
    ("The capital of Norway is", " Oslo"),
    ("Ana Costa works as a", " teacher in Porto"),
    ("Paris", " is a city in France"),
    ("Tomas Berg lives in", " Oslo"),
]


def request(**overrides):
    fields = dict(
        prompt="{} lives in",
        subject="Mira Olsen",
        target_new=" Lisbon",
        target_true=" Oslo",
        rephrase=["The home of {} is", "{} has a house in"],
        locality=[("Tomas Berg lives in", " Oslo"), ("The capital of Norway is", " Oslo")],
        portability=[("The mother tongue of {} is", " Portuguese")],
        case_id=7,
    )
    fields.update(overrides)
    return kedit.EditRequest(**fields)


def forward_count(lm):
    """A list that gets one entry per forward pass of the model."""
    calls = []
    lm.model.register_forward_hook(lambda *_: calls.append(1))
    return calls


@torch.no_grad()
def plain_argmax(lm, prompt, answer):
    """The argmax token at each answer position of prompt + answer (one plain forward pass of
    that row alone) and the answer's ids."""
    prompt_ids, answer_ids = lm.encode(prompt), lm.encode(answer)
    logits = lm.model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
    start = len(prompt_ids) - 1
    return logits[start : start + len(answer_ids)].argmax(-1).tolist(), answer_ids


def test_teacher_forced_matches_a_manual_computation(random_gpt2):
    lm = random_gpt2
    for (prompt, answer), score in zip(PAIRS, score_teacher_forced(lm, PAIRS), strict=True):
        predicted, answer_ids = plain_argmax(lm, prompt, answer)
        hits = sum(p == a for p, a in zip(predicted, answer_ids, strict=True))
        assert score.predicted == tuple(predicted)
        assert score.accuracy == pytest.approx(hits / len(answer_ids))


def test_teacher_forced_metrics_on_golden_values():
    """EasyEdit's teacher-forced metrics, as its code defines them
    (easyeditor/evaluate/evaluate_utils.py `test_prediction_acc`, editors/editor.py `edit`):

    - rewrite, rephrase and portability accuracy of one prompt: `prompt + " " + target` is run in
      one forward pass; the argmax tokens at positions prompt_len - 1 ... end - 1 (each predicting
      the next gold token, the gold prefix given) are compared with the target's tokens, and the
      prompt's value is the mean of that equality over the target's tokens (`np.mean(np.equal(ans,
      label))`); a multi-token target counts each token once, whatever the others. The result is a
      list with one value per prompt.
    - locality of one prompt: the same argmax tokens on `prompt + " " + ground_truth`, taken
      before and after the edit; its value is the mean of their equality over the answer positions
      (`np.mean(np.equal(post, pre))`). The ground truth itself is not compared with anything. One
      value per locality prompt, reported after the edit only (the pre-edit entry is dropped).
    - across cases, its summary (editors/utils.py `summary_metrics`) takes `np.mean` of the
      cases' lists: the mean over all prompts, which is the mean of the cases' means when every
      case has as many prompts of the set (one rewrite and one rephrase prompt always).
      kedit.evaluate reports each case's mean over its prompts and summarize averages the
      cases: the same numbers then; with unequal counts kedit weighs every case equally.
    """
    # Logits [answer tokens, vocab 5] written out; row i predicts answer token i.
    rewrite = [2, 4]
    pre_rewrite = torch.tensor([[0.0, 1, 3, 0, 0], [0, 2, 0, 0, 1]])  # argmax 2, 1: 1 of 2
    post_rewrite = torch.tensor([[0.0, 0, 3, 0, 1], [0, 0, 0, 0, 2]])  # argmax 2, 4: 2 of 2
    near = [1, 3, 0]  # a locality answer
    pre_near = torch.tensor([[0.0, 5, 0, 0, 0], [0, 0, 4, 1, 0], [3, 0, 0, 0, 0]])  # 1, 2, 0
    post_near = torch.tensor([[0.0, 5, 0, 0, 0], [0, 0, 1, 4, 0], [0, 0, 0, 0, 3]])  # 1, 3, 4
    far = [4]
    pre_far, post_far = torch.tensor([[0.0, 0, 1, 0, 0]]), torch.tensor([[0.0, 0, 2, 1, 0]])

    def scores(rewrite_logits, near_logits, far_logits):
        return {
            "rewrite": [TokenScore.of(rewrite_logits, rewrite)],
            "rephrase": [],
            "locality": [TokenScore.of(near_logits, near), TokenScore.of(far_logits, far)],
        }

    pre = scores(pre_rewrite, pre_near, pre_far)
    post = scores(post_rewrite, post_near, post_far)
    assert pre["locality"][0] == TokenScore(pytest.approx(2 / 3), (1, 2, 0))
    # Before the edit: no locality, and an empty probe set is left out.
    assert teacher_forced_metrics(pre, None, {"locality"}) == {"rewrite": [0.5]}
    # After it: locality compares argmax tokens with the unedited model's (1 of 3 kept on the
    # first prompt), never with the answer (2 of 3 match it, before and after).
    assert teacher_forced_metrics(post, pre, {"locality"}) == {
        "rewrite": [1.0],
        "locality": [pytest.approx(1 / 3), 1.0],
    }
    # A set that is not locality is scored as accuracy, also after the edit.
    assert teacher_forced_metrics(post, pre, set())["locality"] == [pytest.approx(2 / 3), 0.0]


def test_batched_scoring_equals_one_at_a_time(random_gpt2):
    lm = random_gpt2
    calls = forward_count(lm)
    batched = score_teacher_forced(lm, PAIRS, batch_size=3)
    assert len(calls) == 2  # one forward pass per batch
    alone = score_teacher_forced(lm, PAIRS, batch_size=1)
    assert batched == alone

    items = [(prompt, (answer, " Oslo")) for prompt, answer in PAIRS]
    batched_nll = score_probability(lm, items, batch_size=64)
    alone_nll = [score_probability(lm, [item])[0] for item in items]
    for got, want in zip(batched_nll, alone_nll, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_empty_prompts_and_answers_are_refused(random_gpt2):
    with pytest.raises(ValueError, match="at least one token"):
        score_teacher_forced(random_gpt2, [("", " Oslo")])
    with pytest.raises(ValueError, match="at least one token"):
        score_probability(random_gpt2, [("Paris is in", ["", " France"])])


def test_probability_is_the_mean_token_nll(random_gpt2):
    lm = random_gpt2
    prompt, answer = PAIRS[2]
    prompt_ids, answer_ids = lm.encode(prompt), lm.encode(answer)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
    logp = torch.log_softmax(logits, -1)
    start = len(prompt_ids) - 1
    manual = -sum(logp[start + i, t] for i, t in enumerate(answer_ids)) / len(answer_ids)
    ((nll,),) = score_probability(lm, [(prompt, [answer])])
    assert nll == pytest.approx(float(manual), abs=1e-5)


def test_probability_keeps_a_prompts_candidates_in_one_batch(random_gpt2):
    lm = random_gpt2
    calls = forward_count(lm)
    items = [(prompt, (answer, " Oslo", " Lisbon")) for prompt, answer in PAIRS[:3]]
    scores = score_probability(lm, items, batch_size=4)
    assert [len(s) for s in scores] == [3, 3, 3]
    assert len(calls) == 3  # 3 + 3 > 4: each prompt's group is a batch of its own


def test_greedy_generation_matches_transformers_generate(random_gpt2):
    lm = random_gpt2
    prompts = [prompt for prompt, _ in PAIRS]
    ours = greedy_generate(lm, prompts, [4, 2, 5, 3, 1], batch_size=3)
    for prompt, budget, generated in zip(prompts, [4, 2, 5, 3, 1], ours, strict=True):
        ids = torch.tensor([lm.encode(prompt)])
        reference = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=budget,
            pad_token_id=lm.tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        eos = lm.tokenizer.eos_token_id
        assert generated == (reference[: reference.index(eos)] if eos in reference else reference)


def test_generation_exact_match_when_the_model_is_forced(random_gpt2):
    lm = random_gpt2
    (lisbon,) = lm.encode(" Lisbon")
    bias = torch.zeros(len(lm.tokenizer))
    bias[lisbon] = 100.0
    lm.model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + bias)
    answers = [" Lisbon", "Lisbon Lisbon.", " Lis", " Oslo"]
    scores = score_generation(lm, [("Mira Olsen lives in", a) for a in answers])
    assert [s.match for s in scores] == [True, True, False, False]
    # As many tokens as the answer has, plus the margin of 2.
    assert scores[0].text == " Lisbon" * 3


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(random_gpt2):
    lm = random_gpt2
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = sample_continuations(lm, ["Mira Olsen lives in", "Paris"], max_new_tokens=8, seed=1)
    assert torch.rand(1) == expected_next
    assert first == sample_continuations(lm, ["Mira Olsen lives in", "Paris"], 8, seed=1)
    assert first != sample_continuations(lm, ["Mira Olsen lives in", "Paris"], 8, seed=2)


def test_unknown_protocol_names_the_value_and_the_known_ones(random_gpt2):
    with pytest.raises(ValueError, match="'exact'.*teacher_forced.*probability.*generation"):
        check_protocol("exact")
    with pytest.raises(ValueError, match="'exact'"):
        evaluate(random_gpt2, request(), protocols=("teacher_forced", "exact"))
    assert [check_protocol(p) for p in PROTOCOLS] == list(PROTOCOLS)


def test_evaluate_checks_its_inputs(random_gpt2):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(random_gpt2, request(), batch_size=0)
    with pytest.raises(TypeError, match="edit"):
        evaluate(random_gpt2, request(), edit="not an edit")
    with pytest.raises(ValueError, match="requests"):
        evaluate(random_gpt2, [])


def test_evaluate_without_an_edit_reports_pre_only(random_gpt2):
    result = evaluate(random_gpt2, request(rephrase=[], portability=[]), protocols="teacher_forced")
    assert set(result) == {"case_id", "pre"}
    assert result["case_id"] == "7"
    # Absent probes are left out; teacher-forced locality needs a post-edit model.
    assert set(result["pre"]["teacher_forced"]) == {"reliability", "robustness"}


def test_evaluate_batches_all_requests_together(random_gpt2):
    lm = random_gpt2
    requests = [request(), request(subject="Tomas Berg", target_new=" Porto", case_id=8)]
    calls = forward_count(lm)
    together = evaluate(lm, requests, protocols=("teacher_forced", "probability"))
    # All teacher-forced pairs in one batch, all probability rows in another.
    assert len(calls) == 2
    for req, result in zip(requests, together, strict=True):
        alone = evaluate(lm, req, protocols=("teacher_forced", "probability"))
        assert result["case_id"] == alone["case_id"]
        for protocol, metrics in alone["pre"].items():
            assert result["pre"][protocol] == pytest.approx(metrics, abs=1e-5)


def test_probability_without_target_true_skips_efficacy_with_a_note(random_gpt2):
    result = evaluate(random_gpt2, request(target_true=None), protocols=["probability"])
    metrics = result["pre"]["probability"]
    assert "reliability" not in metrics and "generalization" not in metrics
    assert {"reliability_nll", "generalization_nll", "locality", "portability_nll"} <= set(metrics)
    assert "target_true" in result["notes"][0]
    assert "notes" not in evaluate(random_gpt2, request(), protocols=["probability"])


def test_evaluate_measures_pre_and_post_around_a_real_edit(random_gpt2):
    lm = random_gpt2
    req = request(locality=[("Tomas Berg lives in", " Oslo"), ("Paris", " is a city in France")])
    protocols = ("teacher_forced", "probability", "generation")
    unedited = evaluate(lm, req, protocols=protocols)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    edit = kedit.edit(lm, req, method="ft-m", hparams={"layers": [1], "lr": 0.05, "steps": 50})
    edited = {k: v.clone() for k, v in lm.model.state_dict().items()}

    result = evaluate(lm, req, edit=edit, protocols=protocols, fluency=True)
    assert edit.applied
    assert all(torch.equal(v, edited[k]) for k, v in lm.model.state_dict().items())
    pre, post = result["pre"], result["post"]
    for protocol in protocols:
        assert pre[protocol] == unedited["pre"][protocol]
    assert post["teacher_forced"]["reliability"] > pre["teacher_forced"]["reliability"]
    assert post["teacher_forced"]["reliability"] == 1.0
    assert post["probability"]["reliability_nll"] < pre["probability"]["reliability_nll"]
    assert "locality" not in pre["teacher_forced"]
    assert "locality" in post["generation"]
    # Sampled text is more varied than a loop over two words, which scores 1 (one word: 0).
    assert set(post["sampling"]) == {"fluency"} and post["sampling"]["fluency"] > 1.0

    # Locality by hand: the share of answer positions whose argmax the edit left as it was.
    edited_argmax = [plain_argmax(lm, p.prompt, p.answer)[0] for p in req.locality]
    edit.undo()
    kept = [
        sum(a == b for a, b in zip(after, plain_argmax(lm, p.prompt, p.answer)[0], strict=True))
        / len(after)
        for p, after in zip(req.locality, edited_argmax, strict=True)
    ]
    assert post["teacher_forced"]["locality"] == pytest.approx(sum(kept) / len(kept))
    again = evaluate(lm, req, edit=edit, protocols=protocols)
    assert not edit.applied
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())
    assert again["pre"] == unedited["pre"]
    assert again["post"] == {p: post[p] for p in protocols}


def test_summarize_averages_per_stage_protocol_and_metric():
    results = [
        {"case_id": "1", "pre": {"teacher_forced": {"reliability": 0.0, "locality": 1.0}}},
        {
            "case_id": "2",
            "pre": {"teacher_forced": {"reliability": 1.0}, "probability": {"reliability": 1.0}},
            "post": {"teacher_forced": {"reliability": 0.5}},
            "notes": ["ignored"],
        },
    ]
    assert summarize(results) == {
        "n_cases": 2,
        "pre": {
            "teacher_forced": {"reliability": 0.5, "locality": 1.0},
            "probability": {"reliability": 1.0},
        },
        "post": {"teacher_forced": {"reliability": 0.5}},
    }
    with pytest.raises(ValueError, match="results"):
        summarize([])


def test_robustness_contexts_are_unrelated_stable_and_optional(random_gpt2):
    from kedit.eval.runner import with_contexts

    req = request(rephrase=[], portability=[])
    first = with_contexts([req], k=3)[0].extra["robustness_contexts"]
    assert len(first) == 3 and len(set(first)) == 3
    assert all(req.subject not in sentence for sentence in first)
    assert with_contexts([req], k=3)[0].extra["robustness_contexts"] == first
    bare = evaluate(random_gpt2, req, protocols="teacher_forced", contexts=0)
    assert "robustness" not in bare["pre"]["teacher_forced"]
    with pytest.raises(ValueError, match="contexts"):
        evaluate(random_gpt2, req, contexts=-1)


def test_perplexity_is_the_exp_of_the_mean_token_nll_whatever_the_padding(tiny_gpt2):
    from kedit.eval.protocols import perplexity, text_nll

    texts = ["Mira Olsen lives in Lisbon.", "Oslo."]
    nlls, counts = [], []
    for text in texts:
        ids = torch.tensor([tiny_gpt2.encode_prompt(text)])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_gpt2.model(input_ids=ids).logits[0, :-1], dim=-1)
        nlls.append(-float(logp.gather(1, ids[0, 1:, None]).sum()))
        counts.append(ids.shape[1] - 1)
    scores = text_nll(tiny_gpt2, texts)
    assert [n for _, n in scores] == counts
    assert [nll for nll, _ in scores] == pytest.approx(nlls, rel=1e-5)
    expected = torch.exp(torch.tensor(sum(nlls) / sum(counts)))
    assert perplexity(tiny_gpt2, texts) == pytest.approx(float(expected), rel=1e-5)
