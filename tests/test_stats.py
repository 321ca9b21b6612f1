import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kedit
from kedit.cli import app
from kedit.hooks import capture
from kedit.stats import (
    DEFAULT_BATCH_TOKENS,
    REAL_TEXT_CORPUS,
    CorpusUnavailable,
    _open_for,
    corpora_dir,
    default_corpus,
    fitting_batch_tokens,
    import_npz,
    list_cached,
    open_corpus,
    second_moment,
    second_moment_eigh,
    second_moments,
    token_batches,
    token_bytes,
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


def test_local_corpus_files_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

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

    table = pa.table({"id": list(range(5)), "text": [*DOCUMENTS[3:5], "  ", *DOCUMENTS[5:7]]})
    parquet = tmp_path / "docs.parquet"
    pq.write_table(table, parquet)
    source = open_corpus(parquet, n_samples=3)
    assert source.id.startswith("docs.parquet-") and source.load() == DOCUMENTS[3:6]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nameless.parquet")
    with pytest.raises(ValueError, match=r"expected a 'text' column, found \['body'\]"):
        open_corpus(tmp_path / "nameless.parquet")

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n".join(DOCUMENTS[:2]) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"text": DOCUMENTS[2]}) + "\n")
    pq.write_table(pa.table({"text": DOCUMENTS[3:5]}), folder / "sub" / "c.parquet")
    (folder / "notes.md").write_text("not a corpus file")
    source = open_corpus(folder)
    assert source.id.startswith("folder-") and source.load() == DOCUMENTS[:5]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt/.jsonl/.parquet files"):
        open_corpus(tmp_path / "empty")


def test_dataset_saved_on_disk_is_a_corpus(random_gpt2, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    rows = {"text": [DOCUMENTS[0], "", *DOCUMENTS[1:]], "n": list(range(len(DOCUMENTS) + 1))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "plain"))
    splits = {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "split"))
    for name in ("plain", "split"):
        source = open_corpus(tmp_path / name, n_samples=6)
        assert source.id.startswith(f"{name}-") and source.n_samples == 6
        assert source.load() == DOCUMENTS[:6]

    moment = second_moment(random_gpt2, 1, corpus=tmp_path / "plain", n_samples=6, progress=False)
    assert_same_moment(moment, direct_moment(random_gpt2, 1, DOCUMENTS[:6], 64))

    def unread(*args, **kwargs):
        raise AssertionError("the dataset was read again")

    monkeypatch.setattr(datasets, "load_from_disk", unread)
    again = second_moment(random_gpt2, 1, corpus=tmp_path / "plain", n_samples=6, progress=False)
    assert torch.equal(again, moment)

    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "no-train")
    )
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"expected a 'train' split, found \['test'\]"):
        open_corpus(tmp_path / "no-train").load()


WIKITEXT_ID = "hf-Salesforce-wikitext-wikitext-103-raw-v1"


def test_hub_corpus_offline_says_at_once_how_to_go_on(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = open_corpus(REAL_TEXT_CORPUS, 100)  # named without reading it
    assert hub.id == WIKITEXT_ID and hub.n_samples == 100
    with pytest.raises(CorpusUnavailable) as raised:
        hub.load()
    message = str(raised.value)
    assert "\n" not in message and "Salesforce/wikitext:wikitext-103-raw-v1" in message
    assert "mom2_corpus=PATH" in message and "kedit stats collect --corpus PATH" in message
    assert "kedit stats import" in message

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusUnavailable, match=r"pip install 'kedit\[corpus\]'"):
        hub.load()


def test_hub_corpus_is_downloaded_once_then_read_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import kedit.stats as stats

    asked = []

    def fake_hub(name, config, split, cache_dir):
        asked.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["", *DOCUMENTS]})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    monkeypatch.setattr(stats, "_hub_reachable", lambda: True)
    assert open_corpus(REAL_TEXT_CORPUS, 4).load() == DOCUMENTS[:4]
    assert asked == [("Salesforce/wikitext", "wikitext-103-raw-v1", "train")]
    assert (corpora_dir() / WIKITEXT_ID / "state.json").is_file()

    monkeypatch.setattr(stats, "_hub_reachable", lambda: False)
    assert open_corpus(REAL_TEXT_CORPUS, 5).load() == DOCUMENTS[:5] and len(asked) == 1

    def broken_hub(*args, **kwargs):
        raise ConnectionError("reset by peer")

    monkeypatch.setattr(stats, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", broken_hub)
    with pytest.raises(ValueError, match="could not read the Hugging Face dataset 'x/y'.*reset"):
        open_corpus("x/y").load()
    assert not (corpora_dir() / "hf-x-y").exists()


def test_a_model_that_is_not_bundled_never_gets_tinyworld(random_gpt2, tiny_gpt2, monkeypatch):
    from kedit.methods.registry import resolve_hparams

    assert default_corpus(tiny_gpt2) == "tinyworld"
    assert default_corpus(random_gpt2) == REAL_TEXT_CORPUS
    assert resolve_hparams("rome", random_gpt2).mom2_corpus == REAL_TEXT_CORPUS
    assert resolve_hparams("rome", tiny_gpt2).mom2_corpus == "tinyworld"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusUnavailable, match="hub cannot be reached"):
        second_moments(random_gpt2, [0], progress=False)


def test_an_edit_records_the_statistics_it_used(random_gpt2, corpus, tmp_path):
    request = kedit.EditRequest(prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo")
    settings = {"mom2_corpus": str(corpus), "mom2_n_samples": 6, "v_steps": 2}
    tokens = sum(len(random_gpt2.encode_prompt(doc)) for doc in DOCUMENTS[:6])

    def expected(layer):
        module = random_gpt2.layout.mlp_out_name(layer)
        return {"layer": layer, "module": module, "n_samples": 6, "tokens": tokens}

    for method, layers in [("rome", [1]), ("memit", [0, 1]), ("alphaedit", [0, 1])]:
        for _ in range(2):  # computed, then from the model's cache
            hparams = {**settings, "layers": layers}
            edit = kedit.edit(random_gpt2, request, method=method, hparams=hparams)
            edit.undo()
            records = edit.info["statistics"]
            assert [{k: r[k] for k in expected(0)} for r in records] == [
                expected(layer) for layer in layers
            ], method
            for record in records:
                assert record["corpus"].startswith("corpus.txt-") and record["max_length"] == 64
                assert record["dtype"] == "float64" and Path(record["path"]).is_file()
    saved = edit.save(tmp_path / "alphaedit.kedit")
    assert kedit.apply(random_gpt2, saved).info["statistics"] == records
    plain = kedit.edit(random_gpt2, request, method="ft-l", hparams={"layers": [1], "steps": 1})
    assert "statistics" not in plain.info


def test_batch_tokens_fit_the_device(random_gpt2):
    assert fitting_batch_tokens(random_gpt2, [0, 1], 64) == DEFAULT_BATCH_TOKENS  # on a CPU
    # float32; width 32, 2 heads, MLP 128: 6*32 + 3*128 + 2*64 + 2*128 values, 128 in float32.
    assert token_bytes(random_gpt2, [0, 1], 64) == 4 * (192 + 384 + 128 + 256) + 4 * 128


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


def test_easyedits_wikipedia_corpus_is_the_models_default(tiny_gpt2, caplog):
    from kedit.methods.registry import resolve_hparams

    params = resolve_hparams("rome", tiny_gpt2, {"mom2_dataset": "wikipedia"})
    assert params.mom2_corpus is None  # the model's default: tinyworld for a bundled model
    assert "Wikipedia 20200501.en" in caplog.text
    assert _open_for(tiny_gpt2, params.mom2_corpus, 10).id.startswith("tinyworld")
