"""What a newcomer hit first: threads, mistyped model names, offline look-ups, bad text."""

import os
import socket

import pytest
import torch
from typer.testing import CliRunner

import kedit
from kedit import lm as lm_module
from kedit.cli import app
from kedit.files import read_text
from kedit.requests import EditRequest

runner = CliRunner()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_bundled_model_runs_single_threaded_unless_told(monkeypatch, restore_threads):
    monkeypatch.delenv("KEDIT_THREADS", raising=False)
    torch.set_num_threads(2)
    kedit.load("tiny-gpt2")
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("KEDIT_THREADS", "2")
    kedit.load("tiny-gpt2")
    assert torch.get_num_threads() == 2


def test_a_large_model_keeps_torchs_threads(monkeypatch, restore_threads):
    monkeypatch.delenv("KEDIT_THREADS", raising=False)
    monkeypatch.setattr(lm_module, "SINGLE_THREAD_MAX_PARAMS", 10)
    torch.set_num_threads(2)
    kedit.load("tiny-gpt2")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_named(monkeypatch, restore_threads, value):
    monkeypatch.setenv("KEDIT_THREADS", value)
    with pytest.raises(
        ValueError, match=f"KEDIT_THREADS: expected a positive integer, got '{value}'"
    ):
        kedit.load("tiny-gpt2")


def test_the_threads_option_reaches_the_model(monkeypatch, restore_threads):
    monkeypatch.delenv("KEDIT_THREADS", raising=False)
    result = runner.invoke(app, ["--threads", "2", "demo"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2


def test_the_threads_option_wins_for_its_command_and_leaves_the_environment(
    monkeypatch, restore_threads
):
    monkeypatch.setenv("KEDIT_THREADS", "3")
    result = runner.invoke(app, ["--threads", "2", "methods", "rome"])  # loads tiny-gpt2
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2
    assert os.environ["KEDIT_THREADS"] == "3"
    monkeypatch.delenv("KEDIT_THREADS")
    kedit.load("tiny-gpt2")  # after the command, a load chooses by itself again
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_a_bad_chosen_thread_count_is_named(value, restore_threads):
    with pytest.raises(ValueError, match="threads: expected a positive integer"):
        with lm_module.using_threads(value):
            pass


def test_a_name_close_to_a_bundled_model_is_answered_at_once(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a mistyped bundled name must not reach the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ValueError, match="did you mean 'tiny-gpt2'"):
        kedit.load("tiny-gpt9")


def test_an_unreachable_hub_fails_fast_with_one_clear_line(monkeypatch):
    calls = []

    def unreachable(address, timeout=None):
        calls.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ValueError) as error:
        kedit.load("some-org/some-model")
    assert "cannot be reached" in str(error.value) and "\n" not in str(error.value)
    assert len(calls) == 1 and calls[0][1] <= lm_module.HUB_PROBE_TIMEOUT_S


def test_a_hub_id_looks_in_the_local_cache_when_offline(monkeypatch):
    seen = {}

    def fake_pretrained(source, **kwargs):
        seen[source] = kwargs.get("local_files_only")
        raise OSError("not cached")

    monkeypatch.setattr(lm_module, "hub_reachable", lambda: False)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fake_pretrained)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        kedit.load("some-org/some-model")
    assert seen == {"some-org/some-model": True}


def test_text_that_is_not_utf8_is_named():
    broken = "{} lives in \udcff"  # how a non-UTF-8 byte arrives from a command line
    with pytest.raises(ValueError, match=r"prompt: .* is not valid UTF-8 text \(character 12\)"):
        EditRequest(prompt=broken, subject="Mira Olsen", target_new=" Lisbon")
    with pytest.raises(ValueError, match=r"locality\[0\].answer: .* is not valid UTF-8"):
        EditRequest(
            prompt="{} lives in",
            subject="Mira Olsen",
            target_new=" Lisbon",
            locality=[("Tomas Berg lives in", " Os\udcfflo")],
        )


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "rome.yaml"
    path.write_bytes(b"v_lr: 0.5\nv_steps: 3 \xff\n")
    with pytest.raises(ValueError, match=r"--hparams-file: .*rome.yaml' is not UTF-8 text "):
        read_text(path, "--hparams-file")
    result = runner.invoke(
        app,
        ["edit", "--prompt", "{} is", "--subject", "y", "--target", " z"]
        + ["--hparams-file", str(path)],
    )
    assert result.exit_code == 2
    assert "byte 0xff at line 2" in result.output and "rome.yaml" in result.output
