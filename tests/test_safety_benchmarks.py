"""Smoke tests of benchmarks/safety.py and benchmarks/personality.py on tiny-gpt2 with judges
built here (the quality targets are measured on tiny-chat; timings are not checked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kedit.data.personalityedit import TRAITS
from kedit.zoo.judges import NgramClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import personality  # noqa: E402
import safety  # noqa: E402


def _judges(folder: Path) -> Path:
    NgramClassifier("cannot", ["safe", "unsafe"], {"cannot": 0}, [[4.0], [0.0]], [0.0, 1.0]).save(
        folder / "judges" / "safety.json"
    )
    NgramClassifier("love", list(TRAITS), {"love": 0}, [[3.0], [0.0], [0.0]], [0.0, 0.5, 0.0]).save(
        folder / "judges" / "personality.json"
    )
    return folder


def test_safety_benchmark_reports_every_run(tmp_path):
    argv = ["--model", "tiny-gpt2", "--judge", str(_judges(tmp_path)), "--skip", "0", "--n", "1"]
    argv += ["--runs", "dinm,dinm-no-kl", "--facts", "4", "--max-new-tokens", "4"]
    report = safety.main(
        [*argv, "--out", str(tmp_path / "safety.json"), "--plot", str(tmp_path / "s.png")]
    )
    assert set(report["runs"]) == {"dinm", "dinm-no-kl"}
    assert report["runs"]["dinm-no-kl"]["hparams"]["kl_factor"] == 0.0
    assert sum(report["runs"]["dinm"]["toxic_layers"].values()) == 1
    assert report["runs"]["dinm"]["post"]["DS"]["protocol"] == "generation"
    assert json.loads((tmp_path / "safety.json").read_text()) == report
    assert (tmp_path / "s.png").stat().st_size > 0


def test_personality_benchmark_lists_missing_methods(tmp_path):
    argv = ["--model", "tiny-gpt2", "--judge", str(_judges(tmp_path)), "--n", "2"]
    report = personality.main([*argv, "--methods", "ft-m,no-such-method", "--n-other", "1"])
    assert report["missing"] == ["no-such-method"] and list(report["runs"]) == ["ft-m"]
    assert set(report["runs"]["ft-m"]["post"]) == {"ES", "DD", "Acc", "TPEI"}


def test_personality_benchmark_has_ike_state_only_the_shortest_target_text(tiny_gpt2):
    from kedit.requests import EditRequest

    texts = [" a long opinion about the topic and more", " short", " a middling opinion"]
    requests = [EditRequest(prompt="Q:", subject="Q", target_new=text) for text in texts]
    seen = []
    make_edit = personality.stating_shortest(tiny_gpt2, lambda chosen: seen.append(chosen))
    make_edit(requests)
    assert seen == [[requests[1]]]
