import json

import pytest
import torch

from kedit.data import load_requests
from kedit.eval.bench import BenchConfig, run_bench
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
    assert first["result"]["pre"] != first["result"]["post"]
