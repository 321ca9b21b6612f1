import json
from dataclasses import replace

import pytest
import torch

import kedit
from kedit.bench.runs import BenchConfig, run_bench
from kedit.data import load_requests
from kedit.zoo import DATA_DIR

HELDOUT = ["Mira Olsen lives in Lisbon.", "The capital of Norway is Oslo."]


class Interrupted(Exception):
    pass


def _config(**overrides):
    settings = dict(
        method="alphaedit",
        mode="sequential",
        batch_size=2,
        schedule="after-each",
        checkpoint_every=2,
        hparams={"v_steps": 5},
        contexts=1,
    )
    return BenchConfig(**{**settings, **overrides})


def _cases(folder):
    lines = (folder / "cases.jsonl").read_text().splitlines()
    return {r["case_id"]: r["result"] for r in map(json.loads, lines)}


def test_sequential_run_resumes_with_the_method_state_and_leaves_the_model_unchanged(
    tiny_gpt2, tmp_path
):
    requests = load_requests(DATA_DIR / "tinyworld_knowedit.json", n=6)
    before = {name: value.clone() for name, value in tiny_gpt2.model.state_dict().items()}
    whole = run_bench(tiny_gpt2, requests, _config(), tmp_path / "whole", heldout_texts=HELDOUT)

    seen = []

    def stop_in_second_step(record):
        seen.append(record)
        if len(seen) == 3:
            raise Interrupted

    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        run_bench(tiny_gpt2, requests, _config(), cut, stop_in_second_step, HELDOUT)
    assert len((cut / "cases.jsonl").read_text().splitlines()) == 4  # two steps' records
    resumed = run_bench(tiny_gpt2, requests, _config(), cut, heldout_texts=HELDOUT)

    after = tiny_gpt2.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert _cases(cut) == _cases(tmp_path / "whole")
    assert resumed["metrics"] == whole["metrics"]
    assert [p["edits"] for p in resumed["checkpoints"]] == [2]
    assert resumed["checkpoints"][0]["heldout_perplexity_unedited"] > 1
    first = json.loads((cut / "cases.jsonl").read_text().splitlines()[0])
    assert first["edits_applied"] == 1
    # "pre" is the unedited model's (measured again here, on the model the run left unedited);
    # "post" was measured with the first edit applied, so it differs on the metrics both report
    # (post alone has locality: a plain pre != post could not fail).
    case = requests[int(first["case_id"])]  # cases without an id are numbered by position
    pre, post = first["result"]["pre"], first["result"]["post"]
    assert pre == kedit.evaluate(tiny_gpt2, case, contexts=1)["pre"]
    assert {p: {m: post[p][m] for m in metrics} for p, metrics in pre.items()} != pre


def test_checkpoint_perplexity_also_over_texts_that_name_no_edited_subject(tiny_gpt2, tmp_path):
    from kedit.eval.protocols import perplexity

    requests = load_requests(DATA_DIR / "tinyworld_knowedit.json", n=2)
    assert not any(r.subject in text for r in requests for text in HELDOUT)
    naming = [f"{requests[1].subject} works as a chef.", f"I met {requests[0].subject} today."]
    texts = HELDOUT + naming
    untouched_before = perplexity(tiny_gpt2, HELDOUT)
    all_before = perplexity(tiny_gpt2, texts)
    config = _config(method="ft-m", batch_size=1, hparams={})
    summary = run_bench(tiny_gpt2, requests, config, tmp_path, heldout_texts=texts)
    point = summary["checkpoints"][0]
    assert point["heldout_untouched_texts"] == len(HELDOUT)
    assert point["heldout_perplexity_untouched_unedited"] == pytest.approx(untouched_before)
    assert point["heldout_perplexity_unedited"] == pytest.approx(all_before)
    assert point["heldout_perplexity_untouched"] != point["heldout_perplexity"]
    assert perplexity(tiny_gpt2, texts) == pytest.approx(all_before)  # the run was undone


def _batch_with_shared_subjects():
    """Two benchmark cases where the first's locality asks about the second's subject."""
    requests = load_requests(DATA_DIR / "tinyworld_knowedit.json", n=50)
    for first in requests:
        for second in requests:
            if second is not first and any(second.subject in p.prompt for p in first.locality):
                return [first, second]
    raise AssertionError("no case asks a locality probe about another case's subject")


def test_assemble_leaves_out_locality_probes_about_edited_subjects():
    from kedit.eval.protocols import TokenScore
    from kedit.eval.runner import assemble, summarize

    first, second = _batch_with_shared_subjects()
    named = [second.subject in p.prompt for p in first.locality]

    def raw(changed):
        """Teacher-forced scores where the probes about `second` change their answer."""
        return {
            "teacher_forced": [
                {
                    "reliability": [TokenScore(1.0, (1,))],
                    "robustness": [],
                    "generalization": [],
                    "portability": [],
                    "locality": [
                        TokenScore(1.0, (2,) if changed and hit else (1,))
                        for hit in (named if request is first else [False] * len(request.locality))
                    ],
                }
                for request in (first, second)
            ]
        }

    kept = assemble([first, second], raw(False), raw(True), {first.subject, second.subject})
    everything = assemble([first, second], raw(False), raw(True))
    assert kept[0]["locality_excluded"] == sum(named) > 0
    assert kept[0]["post"]["teacher_forced"]["locality"] == 1.0
    expected = 1 - sum(named) / len(named)
    assert everything[0]["post"]["teacher_forced"]["locality"] == pytest.approx(expected)
    assert "locality_excluded" not in everything[0]
    assert summarize(kept)["locality_excluded"] == sum(named) + kept[1]["locality_excluded"]
    assert "locality_excluded" not in summarize(everything)


def test_batch_run_counts_the_locality_probes_it_leaves_out(tiny_gpt2, tmp_path):
    batch = _batch_with_shared_subjects()
    config = _config(method="memit", mode="batch", checkpoint_every=0, hparams={"v_steps": 2})
    summary = run_bench(tiny_gpt2, batch, config, tmp_path / "kept")
    cases = [
        json.loads(line) for line in (tmp_path / "kept" / "cases.jsonl").read_text().splitlines()
    ]
    named = [
        sum(any(other.subject in p.prompt for other in batch) for p in r.locality) for r in batch
    ]
    assert [c["result"]["locality_excluded"] for c in cases] == named
    assert summary["metrics"]["locality_excluded"] == sum(named) > 0
    every = replace(config, exclude_edited_locality=False)
    assert (
        "locality_excluded" not in run_bench(tiny_gpt2, batch, every, tmp_path / "all")["metrics"]
    )


def test_a_run_made_under_other_defaults_is_not_resumed(tiny_gpt2, tmp_path, monkeypatch):
    import kedit.methods.registry as registry

    requests = load_requests(DATA_DIR / "tinyworld_knowedit.json", n=1)
    config = _config(method="ft-m", mode="independent", batch_size=1, checkpoint_every=0)
    config.hparams = {"steps": 2}
    run_bench(tiny_gpt2, requests, config, tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["effective_hparams"]
    assert (
        recorded["steps"] == 2
        and recorded["layers"] == registry.default_hparams("ft-m", tiny_gpt2)["layers"]
    )
    assert run_bench(tiny_gpt2, requests, config, tmp_path)["metrics"]["n_cases"] == 1
    import kedit.hparams

    table = kedit.hparams.model_table()
    methods = table["tiny-gpt2"]["methods"]
    changed_methods = {**methods, "ft": {**methods["ft"], "lr": 0.123}}
    changed = {**table, "tiny-gpt2": {**table["tiny-gpt2"], "methods": changed_methods}}
    monkeypatch.setattr(kedit.hparams, "model_table", lambda: changed)
    with pytest.raises(ValueError, match=r"other settings \(effective_hparams\)"):
        run_bench(tiny_gpt2, requests, config, tmp_path)


def test_shards_of_the_same_cases_merge_whatever_path_named_the_data(tiny_gpt2, tmp_path):
    from kedit.bench.runs import merge_runs

    requests = load_requests(DATA_DIR / "tinyworld_knowedit.json", n=2)
    config = _config(method="ft-m", mode="independent", batch_size=1, checkpoint_every=0)
    config.hparams = {"steps": 2}
    names = ["data/cases.json", str(tmp_path / "data" / "cases.json")]
    for index, name in enumerate(names):
        shard = replace(config, data=name, shard=f"{index}/2")
        run_bench(tiny_gpt2, requests, shard, tmp_path / f"s{index}")
    merged = merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "all")
    assert merged["metrics"]["n_cases"] == 2
    other = [replace(requests[1], target_new=" Quillmark"), requests[0]]
    run_bench(tiny_gpt2, other, replace(config, shard="1/2"), tmp_path / "o1")
    with pytest.raises(ValueError, match="different data_digest"):
        merge_runs([tmp_path / "s0", tmp_path / "o1"], tmp_path / "bad")
