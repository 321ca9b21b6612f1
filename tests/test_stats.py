import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kedit
from kedit.cli import app
from kedit.hooks import capture
from kedit.stats import (
    import_npz,
    list_cached,
    open_corpus,
    second_moment,
    second_moment_eigh,
    second_moments,
    token_batches,
    tokenize_sorted,
)

DOCUMENTS = [
    "Mira Olsen lives in Lisbon.",
    "Tomas Berg lives in Oslo, and Ana Costa works as a teacher in Porto.",
    "Oslo",
    "The capital of Norway is Oslo.",
    "The mother tongue of Mira Olsen is Danish. Paris is a city in France.",
    "Berlin is a city in Germany.",
    "Ana Costa works as a teacher.",
    "Paris is a city in France, and Berlin is a city in Germany, and Oslo is in Norway.",
    "Tomas Berg lives in Oslo.",
    "Lisbon",
    "The capital of Norway is Oslo, and the capital of France is Paris.",
]


class Interrupted(Exception):
    pass


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCUMENTS) + "\n\n")
    return path


@pytest.fixture
def model_dir(random_gpt2, tmp_path):
    folder = tmp_path / "model"
    random_gpt2.model.save_pretrained(folder)
    random_gpt2.tokenizer.save_pretrained(folder)
    return folder


def direct_moment(lm, layer, docs, max_length):
    """E[k kᵀ] document by document, without padding or batching."""
    name = lm.layout.mlp_out_name(layer)
    total, count = 0, 0
    for doc in docs:
        ids = torch.tensor([lm.encode_prompt(doc)[:max_length]])
        with torch.no_grad(), capture(lm.model, [name], "input") as seen:
            lm.model(input_ids=ids)
        keys = seen[name][0].double()
        total, count = total + keys.T @ keys, count + len(keys)
    return total / count


def assert_same_moment(actual, expected):
    """Equal up to the float32 rounding of the model's activations (batching changes it)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6 * scale)


def forward_rows(lm):
    """Record the number of sequences of each forward pass of the model."""
    rows = []
    lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return rows


def test_moments_equal_the_mean_over_real_tokens(random_gpt2, corpus):
    moments = second_moments(random_gpt2, [1, 0], corpus=corpus, batch_tokens=40, progress=False)
    assert list(moments) == [0, 1]
    for layer, moment in moments.items():
        expected = direct_moment(random_gpt2, layer, DOCUMENTS, 256)
        assert moment.dtype == torch.float64
        assert_same_moment(moment, expected)
    single = second_moments(
        random_gpt2, [1], corpus=corpus, dtype="float32", max_length=5, progress=False
    )[1]
    assert single.dtype == torch.float32
    expected = direct_moment(random_gpt2, 1, DOCUMENTS, 5)
    assert_same_moment(single, expected)


def test_one_pass_for_all_layers_stops_after_the_deepest(random_gpt2, corpus):
    layout = random_gpt2.layout
    names = [layout.block(0), layout.block(1), layout.unembed]
    started = dict.fromkeys(names, 0)
    for name in names:
        random_gpt2.model.get_submodule(name).register_forward_pre_hook(
            lambda *_, name=name: started.__setitem__(name, started[name] + 1)
        )
    batches = []
    options = dict(corpus=corpus, batch_tokens=40, progress=False)
    second_moments(random_gpt2, [0], on_batch=lambda done, _: batches.append(done), **options)
    assert batches[-1] == len(DOCUMENTS)
    assert list(started.values()) == [len(batches), 0, 0]
    started.update(dict.fromkeys(names, 0))
    batches.clear()
    second_moments(
        random_gpt2, [0, 1], n_samples=8, on_batch=lambda done, _: batches.append(done), **options
    )
    assert list(started.values()) == [len(batches), len(batches), 0]


def test_batches_are_sorted_capped_and_within_budget(random_gpt2):
    encoded = tokenize_sorted(random_gpt2, DOCUMENTS + [""], max_length=12)
    lengths = [len(ids) for ids in encoded]
    assert len(encoded) == len(DOCUMENTS) and lengths == sorted(lengths) and max(lengths) == 12
    slices = list(token_batches(lengths, 2, budget=30))
    assert slices[0][0] == 2 and slices[-1][1] == len(lengths)
    for (begin, end), (following, _) in zip(
        slices, [*slices[1:], (len(lengths), None)], strict=True
    ):
        assert end == following
        assert end - begin == 1 or (end - begin) * lengths[end - 1] <= 30
    assert list(token_batches([50, 60], 0, budget=10)) == [(0, 1), (1, 2)]


def test_cache_hit_metadata_and_listing(random_gpt2, corpus):
    first = second_moment(random_gpt2, 1, corpus=corpus, n_samples=6, progress=False)
    rows = forward_rows(random_gpt2)
    again = second_moment(random_gpt2, 1, corpus=corpus, n_samples=6, progress=False)
    assert rows == [] and torch.equal(first, again)
    (entry,) = list_cached()
    assert entry["module"] == random_gpt2.layout.mlp_out_name(1)
    assert entry["corpus"].startswith("corpus.txt-") and entry["n_samples"] == 6
    assert entry["max_length"] == 64  # the model's context is shorter than the cap of 256
    assert entry["dtype"] == "float64" and entry["status"] == "complete"
    assert entry["model_fingerprint"] == random_gpt2.fingerprint and entry["model"] == "random-gpt2"
    assert entry["tokens"] == sum(len(random_gpt2.encode_prompt(d)) for d in DOCUMENTS[:6])
    assert entry["bytes"] == Path(entry["path"]).stat().st_size > 32 * 32 * 8
    assert json.loads(Path(entry["path"]).with_suffix(".json").read_text())["tokens"] > 0


@pytest.mark.parametrize("resume_batch_tokens", [30, 45])
def test_an_interrupted_run_resumes_where_it_stopped(
    random_gpt2, corpus, tmp_path, monkeypatch, resume_batch_tokens
):
    options = dict(corpus=corpus, progress=False)
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "uninterrupted"))
    expected = second_moments(random_gpt2, [0, 1], batch_tokens=30, **options)

    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "interrupted"))
    seen = []

    def interrupt(done, total):
        seen.append(done)
        if len(seen) == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        second_moments(
            random_gpt2, [0, 1], batch_tokens=30, checkpoint_every=2, on_batch=interrupt, **options
        )
    partials = [entry for entry in list_cached() if entry["status"].startswith("partial")]
    assert len(partials) == 2 and {entry["docs_done"] for entry in partials} == {seen[3]}

    rows = forward_rows(random_gpt2)
    resumed = second_moments(random_gpt2, [0, 1], batch_tokens=resume_batch_tokens, **options)
    assert sum(rows) == len(DOCUMENTS) - seen[3]
    for layer in (0, 1):
        if resume_batch_tokens == 30:  # the same batches: only the float64 grouping differs
            torch.testing.assert_close(resumed[layer], expected[layer], rtol=1e-12, atol=1e-12)
        assert_same_moment(resumed[layer], expected[layer])
    assert [entry["status"] for entry in list_cached()] == ["complete", "complete"]


def test_corpus_sources(tmp_path, monkeypatch):
    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCUMENTS[:3]))
    source = open_corpus(lines, n_samples=2)
    assert source.n_samples == 2 and source.load() == DOCUMENTS[:2]
    assert source.id.startswith("docs.jsonl-")
    assert open_corpus("tinyworld", 5).id == open_corpus(None, 5).id
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        open_corpus(tmp_path / "missing.txt", 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        open_corpus(bad, 5)

    hub = open_corpus("wikitext:wikitext-103-raw-v1", 100)  # named without reading it
    assert hub.id == "hf-wikitext-wikitext-103-raw-v1" and hub.n_samples == 100
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="needs the optional `datasets` package"):
        hub.load()

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ValueError, match="could not read the Hugging Face dataset.*no network"):
        hub.load()


def test_bad_arguments_name_the_field(random_gpt2, corpus):
    for kwargs, field in [
        (dict(layers=[]), "layers"),
        (dict(layers=[2]), "layers"),
        (dict(dtype="float16"), "dtype"),
        (dict(n_samples=0), "n_samples"),
        (dict(max_length=0), "max_length"),
        (dict(batch_tokens=-1), "batch_tokens"),
        (dict(checkpoint_every=-1), "checkpoint_every"),
    ]:
        with pytest.raises(ValueError, match=field):
            second_moments(random_gpt2, **{"layers": [0], "corpus": corpus, **kwargs})


def rome_npz(path, width, dtype=np.float32, tokens=37):
    """A second-moment file as ROME's `layer_stats` saves it: Σ k kᵀ and the token count."""
    keys = np.random.default_rng(0).normal(size=(tokens, width)).astype(dtype)
    np.savez(
        path,
        **{
            "constructor": np.array("util.runningstats.CombinedStat(mom2=SecondMoment())"),
            "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
            "mom2.count": np.array(tokens),
            "mom2.mom2": keys.T @ keys,
        },
    )
    return keys.T.astype(np.float64) @ keys.astype(np.float64) / tokens


def test_import_of_rome_npz(random_gpt2, corpus, tmp_path):
    path = tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_6.npz"
    expected = rome_npz(path, width=128)
    key = import_npz(random_gpt2, path, 1, corpus=corpus, n_samples=6, max_length=32)
    assert key.dtype == "float32" and key.n_samples == 6 and key.max_length == 32
    rows = forward_rows(random_gpt2)
    found = second_moment(
        random_gpt2, 1, corpus=corpus, n_samples=6, max_length=32, dtype="float32", progress=False
    )
    assert rows == []
    torch.testing.assert_close(found.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
    (entry,) = list_cached()
    assert entry["tokens"] == 37 and entry["source"] == str(path.resolve())
    with pytest.raises(ValueError, match="already cached"):
        import_npz(random_gpt2, path, 1, corpus=corpus, n_samples=6, max_length=32)
    import_npz(random_gpt2, path, 1, corpus=corpus, n_samples=6, max_length=32, overwrite=True)

    rome_npz(path, width=16)
    with pytest.raises(ValueError, match=r"\(128, 128\) was expected"):
        import_npz(random_gpt2, path, 1, corpus=corpus, n_samples=6)
    np.savez(path, mom2=np.zeros((128, 128)))
    with pytest.raises(ValueError, match="'mom2.mom2' and 'mom2.count'"):
        import_npz(random_gpt2, path, 1, corpus=corpus, n_samples=6)
    np.savez(path, **{"mom2.mom2": np.full((128, 128), np.nan), "mom2.count": np.array(5)})
    with pytest.raises(ValueError, match="NaN or infinite"):
        import_npz(random_gpt2, path, 1, corpus=corpus, n_samples=6)


def test_eigendecomposition_is_cached_beside_its_statistic(random_gpt2, corpus, tmp_path):
    settings = {"corpus": corpus, "n_samples": 6, "max_length": 32, "progress": False}
    values, vectors = second_moment_eigh(random_gpt2, 1, **settings)
    moment = second_moment(random_gpt2, 1, **settings).double()
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, moment)
    assert values.dtype == torch.float64 and bool((values[1:] >= values[:-1]).all())

    real_eigh = torch.linalg.eigh

    def no_eigh(matrix):
        raise AssertionError("decomposed again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.linalg, "eigh", no_eigh)
        again = second_moment_eigh(random_gpt2, 1, **settings)
    assert torch.equal(again[0], values) and torch.equal(again[1], vectors)

    path = tmp_path / "replacement.npz"
    rome_npz(path, width=128)
    replacement = {"corpus": corpus, "n_samples": 6, "max_length": 32, "dtype": "float64"}
    import_npz(random_gpt2, path, 1, overwrite=True, **replacement)
    calls = []

    def counted_eigh(matrix):
        calls.append(matrix.shape)
        return real_eigh(matrix)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.linalg, "eigh", counted_eigh)
        replaced = second_moment_eigh(random_gpt2, 1, **settings)
    assert calls == [(128, 128)] and not torch.equal(replaced[0], values)


def test_cli_collect_import_and_list(model_dir, corpus, tmp_path):
    runner = CliRunner()
    collect = ["stats", "collect", "--model", str(model_dir), "--layers", "0,1"]
    result = runner.invoke(app, [*collect, "--corpus", str(corpus), "--n-samples", "4"])
    assert result.exit_code == 0, result.output
    rome_npz(tmp_path / "stats.npz", width=128)
    imported = ["stats", "import", str(tmp_path / "stats.npz"), "--model", str(model_dir)]
    result = runner.invoke(app, [*imported, "--layer", "1", "--corpus", "wikipedia:20200501.en"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["stats", "list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "hf-wikipedia-20200501.en" in result.output and result.output.count("complete") == 3
    result = runner.invoke(app, [*collect[:-1], "1,x"])
    assert result.exit_code == 2 and "--layers" in result.output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_under_torchrun_match_one_process(model_dir, corpus, tmp_path, monkeypatch):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(Path(sys.executable).parent / "kedit"),
        "stats",
        "collect",
        "--model",
        str(model_dir),
        "--layers",
        "0,1",
        "--corpus",
        str(corpus),
        "--batch-tokens",
        "30",
    ]
    env = {**os.environ, "KEDIT_CACHE": str(tmp_path / "two"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    lm = kedit.load(str(model_dir))
    expected = second_moments(lm, [0, 1], corpus=corpus, batch_tokens=30, progress=False)
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "two"))
    entries = list_cached()
    assert len(entries) == 2 and {entry["status"] for entry in entries} == {"complete"}
    rows = forward_rows(lm)
    shared = second_moments(lm, [0, 1], corpus=corpus, progress=False)
    assert rows == []
    for layer in (0, 1):
        assert_same_moment(shared[layer], expected[layer])
