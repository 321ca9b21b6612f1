"""Knowledge mechanisms (`kedit.analysis`), checked against references built here: causal
tracing against one plain forward pass per restoration, edge patching against the residual
stream patched by hand, EAP scores against finite differences of patching, the logit lens
against the model's own output; and on every family's tiny random model."""

from __future__ import annotations

import numpy
import pytest
import torch
from test_layout import CONFIGS, tiny_lm

from kedit.analysis import (
    Fact,
    attribute,
    build_graph,
    circuit,
    evaluate_edges,
    known_facts,
    lens,
    locate,
    tinyworld_facts,
    trace,
)
from kedit.analysis._common import TokenizedFact, tokenize_facts
from kedit.analysis.circuit import (
    ContrastPair,
    _Batch,
    contrast_pairs,
    prune,
    select_greedy,
    select_top,
)
from kedit.analysis.graph import CircuitGraph, GraphRun
from kedit.analysis.locate import critical_window
from kedit.analysis.trace import (
    TOKEN_CLASSES,
    CausalTrace,
    average_traces,
    token_classes,
    trace_tokenized,
    window_layers,
)
from kedit.hooks import capture, hooks, replace_input, replace_output
from kedit.methods.registry import resolve_hparams

FACT = Fact("{} lives in", "Mira Olsen", " Oslo")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lives_in(tiny_gpt2):
    return known_facts(tiny_gpt2, tinyworld_facts("lives_in", 0), n=40)


# --- causal tracing --------------------------------------------------------------------------


@torch.no_grad()
def reference_trace(lm, item: TokenizedFact, std, kind, window, samples, seed):
    """ROME's procedure one restoration per forward pass: the batch's row 0 is the clean run,
    rows 1.. the noised runs; a restored state is copied from row 0."""
    start, end = item.subject
    width = lm.model.get_submodule(lm.layout.embed).weight.shape[1]
    noise = std * torch.from_numpy(
        numpy.random.RandomState(seed).randn(samples, end - start, width)
    )
    ids = torch.tensor([item.ids] * (samples + 1))

    def corrupt(x):
        x = x.clone()
        x[1:, start:end] += noise.to(x.dtype)
        return x

    def run(restore):
        managers = [replace_output(lm.model, lm.layout.embed, corrupt)]
        for name, token in restore:

            def put_back(x, token=token):
                x = x.clone()
                x[1:, token] = x[0, token]
                return x

            managers.append(replace_output(lm.model, name, put_back))
        with hooks(*managers):
            logits = lm.model(input_ids=ids).logits[1:, -1]
        return float(torch.softmax(logits.float(), -1)[:, item.answer_id].mean())

    def module(layer):
        layout = lm.layout
        return {"hidden": layout.block, "mlp": layout.mlp_name, "attn": layout.attn_name}[kind](
            layer
        )

    grid = torch.zeros(len(item.ids), lm.n_layers)
    for token in range(len(item.ids)):
        for layer in range(lm.n_layers):
            layers = [layer] if kind == "hidden" else window_layers(layer, window, lm.n_layers)
            grid[token, layer] = run([(module(at), token) for at in layers])
    return run([]), grid


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_batched_trace_equals_one_forward_pass_per_restoration(model, request):
    lm = request.getfixturevalue(model)
    [item] = tokenize_facts(lm, [tinyworld_facts("lives_in", 0)[3]])
    result = trace_tokenized(lm, item, 0.3, samples=3, window=2, seed=5, batch_size=7)
    for kind in ("hidden", "mlp", "attn"):
        low, grid = reference_trace(lm, item, 0.3, kind, 2, 3, 5)
        assert result.low_score == pytest.approx(low, abs=1e-5)
        torch.testing.assert_close(result.scores[kind], grid, atol=1e-5, rtol=1e-4)


def test_window_and_token_classes_follow_romes_definitions():
    assert window_layers(0, 2, 6) == [0]
    assert window_layers(3, 2, 6) == [2, 3]
    assert window_layers(17, 10, 48) == list(range(12, 22))
    assert window_layers(47, 10, 48) == list(range(42, 48))
    classes = token_classes(8, (1, 5))  # x S S S S a b c
    assert classes == {
        "first subject token": [1],
        "middle subject tokens": [2, 3],
        "last subject token": [4],
        "first subsequent token": [5],
        "further tokens": [6],
        "last token": [7],
    }
    assert token_classes(3, (0, 1))["middle subject tokens"] == []


def test_average_trace_averages_class_rows_over_facts():
    def fake(n_tokens, subject, value, low):
        grid = torch.arange(n_tokens * 2, dtype=torch.float).view(n_tokens, 2) + value
        return CausalTrace(
            high_score=1.0,
            low_score=low,
            scores={"mlp": grid},
            window=2,
            samples=1,
            noise_std=1.0,
            tokens=["t"] * n_tokens,
            subject=subject,
            answer=" a",
            correct_prediction=True,
        )

    first, second = fake(5, (0, 3), 0.0, 0.1), fake(4, (1, 2), 100.0, 0.3)
    average = average_traces([first, second])
    # middle subject tokens: only the first fact has one (token 1: [2, 3])
    row = TOKEN_CLASSES.index("middle subject tokens")
    torch.testing.assert_close(average.scores["mlp"][row], torch.tensor([2.0, 3.0]))
    # last token: [8, 9] and [106, 107]; the AIE subtracts the mean low score 0.2
    row = TOKEN_CLASSES.index("last token")
    torch.testing.assert_close(average.indirect_effect("mlp")[row], torch.tensor([56.8, 57.8]))
    assert average.total_effect == pytest.approx(0.8)


def test_trace_peaks_where_tiny_gpt2_reads_names(tiny_gpt2, lives_in):
    result = trace(tiny_gpt2, lives_in[0], samples=4)
    assert result.correct_prediction and result.total_effect > 0.5
    token, layer, effect = result.peak("hidden")
    assert (token, layer) == (len(result.tokens) - 1, tiny_gpt2.n_layers - 1)
    assert effect == pytest.approx(result.total_effect, abs=0.05)


def test_trace_options_are_checked(tiny_gpt2):
    with pytest.raises(ValueError, match="kinds"):
        trace(tiny_gpt2, FACT, kinds=("mlp", "ffn"))
    with pytest.raises(ValueError, match="samples"):
        trace(tiny_gpt2, FACT, samples=0)
    with pytest.raises(ValueError, match="subject"):
        trace(tiny_gpt2, {"prompt": "{} lives in", "subject": ""})


# --- locate and layers: auto -----------------------------------------------------------------


def test_critical_window():
    effect = torch.tensor([0.1, 0.3, 0.5, 0.9, 0.6, 0.2, 0.5])
    assert critical_window(effect) == [2, 3, 4]
    assert critical_window(torch.tensor([0.2, 0.0])) == [0]


def test_locate_finds_tiny_gpt2s_edit_layer_and_layers_auto_uses_it(tiny_gpt2, lives_in):
    located = locate(tiny_gpt2, lives_in[:8], samples=3)
    assert located.rome == [0]  # the layer the model table's tuned ROME setting edits
    assert resolve_hparams("rome", tiny_gpt2).layers == [0]
    cache = tiny_gpt2.cache
    saved = cache.get(("located_layers",))
    cache[("located_layers",)] = located
    try:
        assert resolve_hparams("rome", tiny_gpt2, {"layers": "auto"}).layers == located.rome
        assert resolve_hparams("alphaedit", tiny_gpt2, {"layers": "auto"}).layers == located.memit
    finally:
        cache.pop(("located_layers",))
        if saved is not None:
            cache[("located_layers",)] = saved


# --- logit lens ------------------------------------------------------------------------------


def test_the_lens_last_row_is_the_models_output(tiny_llama):
    result = lens(tiny_llama, "{} lives in", " Oslo", subject="Mira Olsen")
    ids = torch.tensor([tiny_llama.encode_prompt("Mira Olsen lives in")])
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=ids).logits[0, -1]
    target = tiny_llama.encode(" Oslo")[0]
    assert int(result.ranks[-1, -1]) == int((logits > logits[target]).sum())
    probability = torch.softmax(logits.float(), -1)[target]
    assert float(result.probabilities[-1, -1]) == pytest.approx(float(probability), abs=1e-5)
    assert result.ranks.shape == (tiny_llama.n_layers + 1, ids.shape[1])


# --- the computation graph -------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_family_has_a_graph_whose_recomputation_is_the_model(family):
    lm = tiny_lm(family)
    graph = build_graph(lm)  # raises unless recomputing every receiver gives the logits
    config = CONFIGS[family]
    heads = config.get("num_attention_heads", config.get("n_head"))
    groups = config.get("num_key_value_heads", heads)
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    parallel = family in ("gptj", "gpt_neox", "phi")
    assert graph.parallel == (parallel,) * layers
    # Attention receivers read the input and every earlier layer's heads and MLP; an MLP also
    # reads its own layer's heads unless it runs beside them; the logits read every sender.
    expected = 0
    for layer in range(layers):
        before = 1 + layer * (heads + 1)
        expected += (heads + 2 * groups) * before + before + (0 if parallel else heads)
    expected += 1 + layers * (heads + 1)
    assert graph.n_edges == expected
    assert (graph.n_heads, graph.n_groups) == (heads, groups)


def test_tiny_gpt2s_graph_has_the_reference_edge_count(tiny_gpt2):
    assert build_graph(tiny_gpt2).n_edges == 1108


def test_a_residual_stream_that_is_not_the_sum_of_its_writes_is_refused():
    """As after a post-norm block: here a block whose output is rescaled."""
    lm = tiny_lm("gpt2")
    with replace_output(lm.model, lm.layout.block(1), lambda x: 2 * x):
        with pytest.raises(ValueError, match="pre-norm residual stream"):
            build_graph(lm)


def _pairs(lm, n=6):
    facts = known_facts(lm, tinyworld_facts("lives_in", 0), n=60)
    return contrast_pairs(lm, facts, seed=1)[:n]


def _metric(lm, batch, ids):
    with torch.no_grad():
        return batch.metric(lm.model(input_ids=ids, attention_mask=batch.mask).logits, "logit_diff")


def test_patching_no_edge_is_the_clean_run_and_every_edge_the_corrupted_run(tiny_gpt2):
    pairs = _pairs(tiny_gpt2)
    graph = build_graph(tiny_gpt2)
    batch = _Batch.of(tiny_gpt2, pairs)
    clean = float(_metric(tiny_gpt2, batch, batch.clean).mean())
    corrupted = float(_metric(tiny_gpt2, batch, batch.corrupted).mean())
    kept = evaluate_edges(tiny_gpt2, pairs, graph.real, "logit_diff")
    assert kept["metric"] == pytest.approx(clean, rel=1e-4) and kept["faithfulness"] == 1.0
    assert kept["corrupted_metric"] == pytest.approx(corrupted, rel=1e-4, abs=1e-4)
    dropped = evaluate_edges(tiny_gpt2, pairs, torch.zeros_like(graph.real), "logit_diff")
    assert dropped["metric"] == pytest.approx(corrupted, rel=1e-4, abs=1e-4)
    # normalised between the corrupted run (0) and the full model (1); the share kept is raw
    assert dropped["faithfulness"] == pytest.approx(0.0, abs=1e-4)
    assert dropped["metric_kept"] == pytest.approx(corrupted / clean, rel=1e-4)


def test_patching_one_edge_equals_patching_the_residual_stream_by_hand(tiny_gpt2):
    """input → logits, m2 → logits and input → m3: the receiver's input moved by the
    sender's corrupted-minus-clean output, with the model's own modules."""
    lm, layout = tiny_gpt2, tiny_gpt2.layout
    pairs = _pairs(lm)
    graph = build_graph(lm)
    batch = _Batch.of(lm, pairs)
    names = [layout.block(0), layout.mlp_name(2)]

    def senders(ids):
        with torch.no_grad(), capture(lm.model, names[:1], "input") as entering:
            with capture(lm.model, names[1:]) as leaving:
                lm.model(input_ids=ids, attention_mask=batch.mask)
        return entering[names[0]], leaving[names[1]]

    clean_in, clean_mlp = senders(batch.clean)
    corrupt_in, corrupt_mlp = senders(batch.corrupted)
    cases = [
        ("input", "logits", layout.final_norm, corrupt_in - clean_in),
        ("m2", "logits", layout.final_norm, corrupt_mlp - clean_mlp),
        ("input", "m3", layout.in_block(3, layout.mlp_norm), corrupt_in - clean_in),
    ]
    for sender, receiver, module, shift in cases:
        with torch.no_grad(), replace_input(lm.model, module, lambda x, s=shift: x + s):
            by_hand = float(_metric(lm, batch, batch.clean).mean())
        edges = graph.real.clone()
        edges[graph.senders.index(sender), graph.receivers.index(receiver)] = False
        patched = evaluate_edges(lm, pairs, edges, "logit_diff")["metric"]
        assert patched == pytest.approx(by_hand, rel=1e-4, abs=1e-4), (sender, receiver)


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_eap_scores_are_the_first_order_effect_of_patching_an_edge(tiny_gpt2, method):
    """EAP: d metric / dε of the clean run with one edge carrying clean + ε (corrupted − clean).
    EAP-IG with one step takes the gradient at the corrupted input, the whole corrupted run:
    there the effect of one edge carrying corrupted + ε (clean − corrupted) is −score."""
    lm = tiny_gpt2
    lm.model.double()
    try:
        pairs = _pairs(lm, n=3)
        graph = build_graph(lm)
        scores = attribute(lm, pairs, method, steps=1)
        batch = _Batch.of(lm, pairs)
        with torch.no_grad(), GraphRun(lm, graph) as run:
            lm.model(input_ids=batch.clean, attention_mask=batch.mask)
            clean = run.senders()
        with torch.no_grad(), GraphRun(lm, graph) as run:
            lm.model(input_ids=batch.corrupted, attention_mask=batch.mask)
            corrupted = run.senders()
        base, other, ids, sign = (
            (clean, corrupted, batch.clean, 1)
            if method == "eap"
            else (corrupted, clean, batch.corrupted, -1)
        )
        edges = ["input->a0.h1<q>", "a0.h2->a3.h0<k>", "m1->a2.h3<v>", "a4.h0->m4", "m5->logits"]
        eps = 1e-4
        for name in edges:
            sender, receiver = name.split("->")
            u, r = graph.senders.index(sender), graph.receivers.index(receiver)
            patch = torch.zeros(len(graph.senders), len(graph.receivers))
            patch[u, r] = 1.0
            values = []
            for step in (eps, -eps):
                source = base + step * (other - base)
                with torch.no_grad(), GraphRun(lm, graph, corrupted=source, patch=patch):
                    out = lm.model(input_ids=ids, attention_mask=batch.mask).logits
                final = out[torch.arange(len(pairs)), batch.last]  # in float64, unlike .metric
                values.append(
                    float(
                        (
                            final.gather(1, batch.good[:, None])
                            - final.gather(1, batch.bad[:, None])
                        ).sum()
                    )
                )
            effect = (values[0] - values[1]) / (2 * eps) / len(pairs)
            assert sign * effect == pytest.approx(float(scores[u, r]), rel=1e-3, abs=1e-6), name
    finally:
        lm.model.float()


def _toy_graph() -> CircuitGraph:
    """One layer, one head, one MLP: senders input, a0.h0, m0; receivers q, k, v, m0, logits."""
    return CircuitGraph(
        n_layers=1,
        n_heads=1,
        n_groups=1,
        head_dim=1,
        parallel=(False,),
        senders=("input", "a0.h0", "m0"),
        receivers=("a0.h0<q>", "a0.h0<k>", "a0.h0<v>", "m0", "logits"),
        upstream=(1, 1, 1, 2, 3),
    )


def test_selection_and_pruning_on_a_hand_made_graph():
    graph = _toy_graph()
    scores = torch.tensor(
        [
            [0.1, -0.2, 0.0, 0.05, -3.0],
            [0.0, 0.0, 0.0, -0.4, 1.0],
            [0.0, 0.0, 0.0, 0.0, 0.01],
        ]
    )
    top = select_top(graph, scores, 3)
    assert top.nonzero().tolist() == [[0, 4], [1, 3], [1, 4]]
    # a0.h0 keeps two outgoing edges but no incoming one: pruning removes it and them
    assert prune(graph, top).nonzero().tolist() == [[0, 4]]
    assert select_top(graph, scores, 4).nonzero().tolist() == [[0, 1], [0, 4], [1, 3], [1, 4]]
    # greedy grows from the logits: input→logits, a0.h0→logits, then a0.h0's inputs; the
    # strong a0.h0→m0 stays out, as m0 never joins
    greedy = select_greedy(graph, scores, 4).nonzero().tolist()
    assert greedy == [[0, 0], [0, 1], [0, 4], [1, 4]]
    with pytest.raises(ValueError, match="edges"):
        select_top(graph, scores, 99)


def test_an_eap_ig_circuit_is_faithful_and_random_ones_are_not(tiny_gpt2, lives_in):
    result = circuit(tiny_gpt2, lives_in, size=300, curve=[300], random_seeds=2)
    assert result.evaluation["faithfulness"] > 0.7
    assert result.curve[0]["random_faithfulness"] < 0.2
    assert result.evaluation["hit"] >= 0.9
    assert result.to_dot().startswith("digraph circuit {")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "phi", "opt"])
def test_trace_and_circuit_run_on_a_random_model_of_each_family(family):
    lm = tiny_lm(family)
    facts = [
        Fact("{} lives in", "Mira Olsen", " Oslo"),
        Fact("{} lives in", "Tomas Berg", " Lisbon"),
    ]
    result = trace(lm, facts[0], samples=2)
    assert set(result.scores) == {"hidden", "mlp", "attn"}
    clean, corrupted = tokenize_facts(lm, facts)
    found = circuit(lm, [ContrastPair(clean, corrupted)], method="eap", size=20)
    kept = evaluate_edges(lm, [ContrastPair(clean, corrupted)], build_graph(lm).real, "logit_diff")
    assert kept["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert 0 < found.n_edges <= 20


# --- edits seen through mechanisms -----------------------------------------------------------


def test_after_rome_the_new_answer_is_read_from_the_edited_mlp(tiny_gpt2, lives_in):
    import kedit
    from kedit.analysis import edit_mechanisms

    fact = lives_in[5]
    request = kedit.EditRequest(
        prompt=fact.prompt, subject=fact.subject, target_new=" Tokyo", target_true=fact.answer
    )
    edit = kedit.edit(tiny_gpt2, request, method="rome")  # the model table's layer 0
    try:
        partners = tinyworld_facts("lives_in", 0)
        seen = edit_mechanisms(
            tiny_gpt2, edit, request, "rome", partners, n_partners=4, window=1, size=150
        )
        assert edit.applied
        last_subject = seen.trace_before.subject[1] - 1
        token, layer, effect = seen.trace_after.peak("mlp")
        assert (token, layer) == (last_subject, 0)
        assert effect > 2 * float(seen.trace_before.indirect_effect("mlp")[last_subject, 0])
        report = seen.to_json()
        assert report["new_answer"] == " Tokyo" and report["old_answer"] == fact.answer
        diff = seen.circuits
        union = int((diff.before.edges | diff.after.edges).sum())
        assert diff.overlap == pytest.approx(diff.shared_edges / union)
    finally:
        edit.undo()


# --- the command line ------------------------------------------------------------------------


def test_cli_trace_lens_locate_and_circuit(tmp_path, lives_in):
    import json

    from typer.testing import CliRunner

    from kedit.cli import app

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(fact.to_dict()) + "\n" for fact in lives_in[:24]))
    fact = lives_in[0]

    def run(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    out = run(
        "trace",
        "--prompt",
        fact.prompt,
        "--subject",
        fact.subject,
        "--samples",
        "2",
        "--out",
        tmp_path / "one",
    )
    assert "total effect" in out and (tmp_path / "one" / "trace.png").is_file()
    run("trace", "--data", data, "--n", "3", "--kinds", "mlp", "--out", tmp_path / "avg")
    saved = json.loads((tmp_path / "avg" / "average_trace.json").read_text())
    assert saved["n_facts"] == 3 and list(saved["scores"]) == ["mlp"]
    assert "block 5" in run("lens", "--prompt", fact.prompt, "--subject", fact.subject)
    assert "ROME layer [0]" in run("locate", "--data", data, "--n", "4", "--samples", "2")
    run(
        "circuit",
        "--data",
        data,
        "--n",
        "20",
        "--method",
        "eap",
        "--size",
        "100",
        "--curve",
        "100",
        "--out",
        tmp_path / "circuit",
    )
    for name in ("circuit.json", "circuit.dot", "circuit.png", "faithfulness.png"):
        assert (tmp_path / "circuit" / name).is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trace", "--out", "o"], "--prompt/--subject"),
        (["trace", "--data", "missing.json", "--out", "o"], "missing.json"),
        (["trace", "--prompt", "{} is", "--subject", "x", "--kinds", "ffn", "--out", "o"], "kinds"),
        (["circuit", "--data", "missing.json", "--out", "o"], "missing.json"),
        (["lens", "--prompt", "{} lives in"], "subject"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args, message):
    from typer.testing import CliRunner

    from kedit.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_evolution_follows_facts_from_an_untrained_to_a_trained_checkpoint(tmp_path, lives_in):
    import shutil

    from transformers import AutoModelForCausalLM

    from kedit.analysis import evolution
    from kedit.zoo import model_path

    trained = model_path("tiny-gpt2")
    untrained = tmp_path / "step-0"
    config = AutoModelForCausalLM.from_pretrained(trained).config
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(untrained)
    for file in trained.iterdir():
        if "token" in file.name:
            shutil.copy(file, untrained / file.name)
    result = evolution([untrained, trained], lives_in[:6], samples=2)
    assert result.known_share == [0.0, 1.0]
    assert set(result.first_known().values()) == {1}
    assert result.effects[0] == [] and result.peak_layers[1] == 0
    assert result.to_json()["peak_layers"] == [None, 0]
