"""Smoke tests of benchmarks/safety.py, personality.py and personality_mend.py on tiny-gpt2 with
judges built here (the quality targets are measured on tiny-chat; timings are not checked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kedit.data.personalityedit import TRAITS
from kedit.zoo.judges import NgramClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import personality  # noqa: E402
import personality_mend  # noqa: E402
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


def test_ike_states_only_the_shortest_target_text_and_other_methods_get_all(tiny_gpt2):
    from kedit.eval.personality import stating_ike_texts
    from kedit.requests import EditRequest

    texts = [" a long opinion about the topic and more", " short", " a middling opinion"]
    requests = [EditRequest(prompt="Q:", subject="Q", target_new=text) for text in texts]
    seen = []
    for method, stated in (("ike", "shortest"), ("ike", "all"), ("ft-m", "shortest")):
        stating_ike_texts(tiny_gpt2, method, stated, seen.append)(requests)
    assert seen == [[requests[1]], requests, requests]


def test_mend_on_opinions_trains_on_the_other_topics_and_measures_the_held_out_ones(tmp_path):
    argv = ["--model", "tiny-gpt2", "--judge", str(_judges(tmp_path)), "--n", "6"]
    argv += ["--heldout-every", "3", "--steps", "2", "--n-other", "1"]
    report = personality_mend.main([*argv, "--editor-dir", str(tmp_path / "editor")])
    # cases 2 and 5 held out; the four others give one request per target-trait text (4 each)
    assert len(report["heldout_topics"]) == 2 and report["train_topics"] == 4
    assert report["train_requests"] == 16
    assert (tmp_path / "editor" / "editor.safetensors").is_file()
    assert set(report["runs"]) == {
        "mend (trained on opinions)",
        "mend (bundled, trained on facts)",
        "ft-m",
    }
    for run in report["runs"].values():
        assert set(run["post"]) == {"ES", "DD", "Acc", "TPEI"}
        assert run["post"]["ES"]["n"] == 2


def test_opinion_requests_probe_locality_on_another_topic(tiny_gpt2, tmp_path):
    from kedit.data.personalityedit import load_personalityedit
    from kedit.eval.judges import get_judge
    from kedit.eval.personality import PersonalityRun
    from kedit.zoo import DATA_DIR

    cases = list(load_personalityedit(DATA_DIR / "tinyworld2_personality.json", n=5))
    train, heldout = personality_mend.split_cases(cases, 5)
    assert [c.topic for c in heldout] == [cases[4].topic] and train == cases[:4]
    run = PersonalityRun(tiny_gpt2, get_judge("personality", _judges(tmp_path)))
    requests = personality_mend.opinion_requests(run, train)
    assert len(requests) == sum(len(c.texts[c.target]) for c in train)
    for request in requests:
        (probe,) = request.locality
        assert request.subject not in probe.prompt
        assert any(c.topic in probe.prompt for c in train)


def test_es_is_split_by_the_topics_a_chat_models_opinion_updates_trained_on(tmp_path):
    from kedit.zoo.chatworld import build_chat_world

    chat = build_chat_world(0, 320)
    heldout = set(chat.opinion_topics("heldout"))
    records = [{"topic": t, "post": {"ES": t in heldout}} for t in chat.topics]
    meta = {"world_seed": 0, "n_people": 320, "recipe": {"world_version": 2}}
    (tmp_path / "kedit_zoo.json").write_text(json.dumps(meta))
    groups = personality.es_by_topic_group(personality.opinion_topic_groups(str(tmp_path)), records)
    assert groups == {
        "train": {"ES": 0.0, "n": len(chat.topics) - len(heldout)},
        "heldout": {"ES": 1.0, "n": len(heldout)},
    }
    assert personality.opinion_topic_groups("tiny-gpt2") is None
    assert personality.es_by_topic_group(None, records) is None
