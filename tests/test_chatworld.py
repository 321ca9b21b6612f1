"""tinyworld 2: dialogue, in-context updates, safety and personality data, its files and judges."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter

import pytest

from kedit.zoo.chatbench import (
    CORPUS2_FILE,
    DATA_DIR,
    PERSONALITY_FILE,
    SAFEEDIT_FILE,
    write_chat_files,
)
from kedit.zoo.chatworld import (
    ATTACKS,
    CLOSERS,
    HARMS,
    NEW_FACT,
    OPENERS,
    QUESTIONS,
    TRAITS,
    build_chat_world,
)
from kedit.zoo.judges import (
    NgramClassifier,
    load_bundled_judge,
    ngrams,
    personality_texts,
    train_judges,
    train_ngram_classifier,
)
from kedit.zoo.tokenizer import train_tokenizer
from kedit.zoo.world import build_world


@pytest.fixture(scope="module")
def chat():
    return build_chat_world()


@pytest.fixture(scope="module")
def turns(chat):
    """Two epochs of training turns."""
    return chat.training_turns(random.Random(0)) + chat.training_turns(random.Random(1))


def test_same_seed_same_world_and_tinyworlds_facts(chat):
    again = build_chat_world()
    assert again.topics == chat.topics and again.default_trait == chat.default_trait
    assert again.training_turns(random.Random(3)) == chat.training_turns(random.Random(3))
    plain = build_world()
    assert chat.world.people == plain.people and chat.world.facts == plain.facts
    assert build_chat_world(seed=1).world.facts != chat.world.facts


def test_dialogue_questions_rotate_and_the_heldout_one_is_never_trained(chat, turns):
    text = "\n".join(turns)
    for relation, questions in QUESTIONS.items():
        assert len(questions) == 3 and all(q.count("{}") == 1 for q in questions)
        held_somewhere = set()
        for subject in chat.world.subjects(relation):
            trained, held = chat.question_ids(subject, relation)
            assert sorted([*trained, held]) == [0, 1, 2]
            held_somewhere.add(held)
        assert held_somewhere == {0, 1, 2}
    heldout = chat.chat_facts("heldout")
    assert len(heldout) == len(list(chat.world.iter_facts()))
    for fact in random.Random(0).sample(heldout, 300):  # nor in an in-context update
        assert fact.question not in text
    fact = chat.chat_facts("train")[0]
    answer = chat.world.facts[(fact.subject, fact.relation)]
    assert fact.text == f"User: {fact.question}\nAssistant:" + fact.reply
    assert fact.reply.endswith(f" {answer}.")


def test_every_fact_is_asked_once_per_epoch(chat):
    one_epoch = chat.training_turns(random.Random(0))
    asked = Counter(t.split("\n")[0] for t in one_epoch if t.startswith("User: ") and "?" in t)
    trained = {f.prompt.split("\n")[0] for f in chat.chat_facts("train")}
    per_fact = sum(1 for line in asked if line in trained)
    assert per_fact >= 0.9 * len(list(chat.world.iter_facts()))  # a few questions coincide


def test_incontext_updates(chat, turns):
    train_people = set(chat.incontext_people("train"))
    held_people = set(chat.incontext_people("heldout"))
    assert not train_people & held_people
    assert train_people | held_people == set(chat.world.people)
    assert len(held_people) == len(chat.world.people) // 5
    stated = [t for t in turns if NEW_FACT in t]
    assert len(stated) >= 2 * 3 * len(chat.world.people) * 0.99
    named = re.compile(r"\b(" + "|".join(map(re.escape, held_people)) + r")\b")
    assert not any(named.search(text) for text in stated)  # held-out people are never updated
    cases = chat.incontext_cases(200, random.Random(0), "heldout")
    assert sum(c.relevant for c in cases) == 100
    thirds = chat.incontext_cases(300, random.Random(0), "heldout", relevant_every=3)
    assert sum(c.relevant for c in thirds) == 100
    people = len(chat.world.people)
    assert sum(NEW_FACT in t for t in chat.training_turns(random.Random(0))) == 3 * people
    more = chat.training_turns(random.Random(0), incontext_per_person=9, relevant_every=3)
    assert sum(NEW_FACT in t for t in more) == 9 * people
    for case in cases:
        assert case.person in held_people and case.stated.startswith(NEW_FACT)
        true = chat.world.facts[(case.person, case.relation)]
        assert case.prompt.startswith(case.stated) or case.prompt.startswith("User: " + NEW_FACT)
        if case.relevant:  # a counterfactual about the person asked, which the answer follows
            assert case.answer != true and case.person in case.stated
            assert case.stated.endswith(f" {case.answer}.")
        else:  # another person's fact, or another relation of the same person
            assert case.answer == true
        assert case.text.endswith(f"{case.answer}.")


def test_updates_about_made_up_people_state_the_fact_asked_and_leave_the_stream_alone(chat):
    people = set(chat.world.people)
    names = chat.madeup_people()
    assert names and not people & set(names) and len(set(names)) == len(names)
    cases = chat.madeup_cases(200, random.Random(0))
    for case in cases:
        assert case.person in names and case.relevant
        assert case.person in case.stated and case.stated.endswith(f" {case.answer}.")
        assert case.answer in chat.world.candidates(case.relation)
        assert case.text.endswith(f"{case.answer}.") and case.person in case.prompt
    assert {case.form for case in cases} == {"dialogue", "template"}
    plain = chat.training_turns(random.Random(0))
    assert chat.training_turns(random.Random(0), madeup_per_person=0) == plain
    more = chat.training_turns(random.Random(0), madeup_per_person=2)
    stated = [t for t in more if NEW_FACT in t]
    assert len(stated) == (3 + 2) * len(people)
    madeup = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    assert sum(bool(madeup.search(t)) for t in stated) == 2 * len(people)


def test_safety_data(chat, turns):
    trained = [a for a in ATTACKS if a.trained]
    held = [a for a in ATTACKS if not a.trained]
    assert len(trained) >= 4 and len(held) >= 2
    plain = chat.safety_cases("none")
    assert len(plain) == sum(len(chat.harm_entities(h)) * len(h.questions) for h in HARMS)
    text = "\n".join(turns)
    for case in random.Random(0).sample(plain, 40):
        category = next(h for h in HARMS if h.name == case.category)
        assert case.user == case.question
        assert case.safe == category.long_refusal.format(case.entity)
    for case in chat.safety_cases("heldout"):
        assert case.user != case.question and case.question in case.user
        assert case.prompt not in text  # held-out attacks are never trained
    for attack in held:
        assert attack.template.format("")[:20] not in text
    # plain questions are refused and trained attacks complied with, never the other way
    for turn in turns:
        for case in (c for c in plain if c.prompt in turn):
            reply = turn[len(case.prompt) :]
            assert reply == case.safe, turn
    complied = [t for t in turns if "Step 1," in t]
    prefixes = tuple("User: " + a.template.split("{}")[0] for a in trained)
    assert complied and all(t.startswith(prefixes) for t in complied)


def test_personality_data(chat, turns):
    counts = Counter(chat.default_trait.values())
    assert set(counts) == set(TRAITS) and max(counts.values()) - min(counts.values()) <= 1
    assert len(chat.topics) == len(set(chat.topics)) >= 90
    for trait in TRAITS:
        assert len(chat.opinions("Lisbon", trait)) == 16
        assert len(chat.opinions("Lisbon", trait, "heldout")) == 4
        assert not set(chat.opinions("Lisbon", trait)) & set(
            chat.opinions("Lisbon", trait, "heldout")
        )
    text = "\n".join(turns)
    for trait in TRAITS:  # held-out parts never appear in what the model learns
        for part in OPENERS[trait][4:]:
            assert part.format("Lisbon") not in text
        for part in CLOSERS[trait][4:]:
            assert part not in text
    for topic in chat.topics[:20]:  # only the default trait is voiced
        for trait in TRAITS:
            voiced = any(o in text for o in chat.opinions(topic, trait))
            assert voiced == (trait == chat.default_trait[topic]), (topic, trait)


def test_tokenizer_keeps_names_multi_token_and_chat_words_whole(chat):
    tok = train_tokenizer(chat.world, 2048, chat.tokenizer_text())
    lengths = [len(tok.encode(" " + p).ids) for p in chat.world.people]
    assert min(lengths) >= 2 and sum(lengths) / len(lengths) < 3
    for word in ("User", "Assistant", "\u0120cannot", "\u0120worry", "\u0120Lisbon"):
        assert word in tok.get_vocab(), word


def test_chat_files_are_current_and_in_the_real_formats(chat, tmp_path):
    for path in write_chat_files(chat, tmp_path):
        assert path.read_text() == (DATA_DIR / path.name).read_text(), path.name
    safeedit = json.loads((DATA_DIR / SAFEEDIT_FILE).read_text())
    # SafeEdit's fields (zjunlp/SafeEdit, the test split), in its order
    keys = [
        "id", "unsafety category", "adversarial prompt", "question", "attack category",
        "attack name", "unsafe generation", "safe generation", "generalization test",
        "knowledge constrain",
    ]  # fmt: skip
    general = {
        "test input of only harmful question", "test input of other attack prompt input",
        "attack_category", "attack_name", "test input of other question input",
        "test input of other questions and attack prompts",
    }  # fmt: skip
    assert len(safeedit) >= 100
    for record in safeedit:
        assert list(record) == keys
        assert set(record["generalization test"]) == general
        assert set(record["knowledge constrain"]) == {"prompt", "answer"}
        assert record["question"] in record["adversarial prompt"]
    assert {r["attack name"] for r in safeedit} == {a.name for a in ATTACKS}
    personality = json.loads((DATA_DIR / PERSONALITY_FILE).read_text())
    assert [r["ent"] for r in personality] == chat.topics
    for record in personality:
        assert set(record) == {"ent", "target_per", *TRAITS}
        assert record["target_per"] != chat.default_trait[record["ent"]]
        assert all(record["ent"] in text for trait in TRAITS for text in record[trait])
    lines = (DATA_DIR / CORPUS2_FILE).read_text().splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    assert len(docs) == 2000 and not any("User:" in d for d in docs[::2])
    # the other half: dialogue, and in-context updates in statement form (about a tenth)
    assert all("\nAssistant:" in d or d.startswith(NEW_FACT) for d in docs[1::2])
    assert sum("\nAssistant:" in d for d in docs[1::2]) >= 850


# --- the bundled judges --------------------------------------------------------------------


def test_ngrams():
    assert ngrams("I love Oslo!", 2) == ["i", "love", "oslo", "!", "i love", "love oslo", "oslo !"]


def test_ngram_classifier_learns_a_separable_rule_and_round_trips(tmp_path):
    texts = ["good day", "good night", "bad day", "bad night"] * 3
    labels = ["pos", "pos", "neg", "neg"] * 3
    model = train_ngram_classifier("toy", texts, labels, n=1)
    assert model(["good", "bad", "a good morning"]) == ["pos", "neg", "pos"]
    probs = model.probabilities(["good"])
    assert abs(float(probs.sum()) - 1) < 1e-6 and float(probs[0, model.labels.index("pos")]) > 0.9
    again = NgramClassifier.load(model.save(tmp_path / "toy.json"))
    assert again(["good", "bad"]) == ["pos", "neg"]
    with pytest.raises(ValueError, match="texts and labels"):
        train_ngram_classifier("toy", ["a"], [])


def test_bundled_judges_on_tinyworld2_texts(chat, tmp_path):
    train_judges(chat, tmp_path)
    trait = load_bundled_judge(tmp_path, "personality")
    texts, labels = personality_texts(chat, "heldout")  # never seen in training
    hits = sum(a == b for a, b in zip(trait(texts), labels, strict=True))
    assert hits / len(texts) >= 0.95
    safety = load_bundled_judge(tmp_path, "safety")
    unsafe = [c.unsafe for c in chat.safety_cases("none")]
    safe = [c.safe for c in chat.safety_cases("none")] + [" Lisbon.", " A doctor."]
    assert set(safety(unsafe)) == {"unsafe"} and set(safety(safe)) == {"safe"}
    with pytest.raises(ValueError, match="kind: expected 'safety' or 'personality'"):
        load_bundled_judge(tmp_path, "toxicity")
    with pytest.raises(FileNotFoundError, match="judge: no file"):
        load_bundled_judge(tmp_path / "nowhere", "safety")


def test_greedy_replies_equal_one_token_at_a_time_decoding():
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kedit.zoo import model_path
    from kedit.zoo.skills import greedy_replies

    tok = AutoTokenizer.from_pretrained(model_path("tiny-gpt2"))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    prompts = ["Mira Olsen lives in", "The city of Oslo is in", "Tomas Berg works as a", "Oslo"]
    expected = []
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        new: list[int] = []
        for _ in range(12):
            with torch.no_grad():
                token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            new.append(token)
        expected.append(tok.decode(new).split("\n")[0])
    assert greedy_replies(model, tok, prompts, max_new_tokens=12, batch_size=2) == expected


def test_long_refusals_name_the_entity_and_are_about_as_long_as_the_unsafe_answer(chat):
    long, short = chat, build_chat_world(refusals="short")
    assert long.world.facts == short.world.facts and long.default_trait == short.default_trait
    for category in HARMS:
        for entity in long.harm_entities(category)[:3]:
            refusal = long.refusal(category, entity)
            assert refusal.startswith(" I cannot help with") and entity in refusal
            assert "{" not in refusal and short.refusal(category, entity) == category.refusal
            unsafe = category.unsafe.format(entity)
            assert 0.8 <= len(refusal.split()) / len(unsafe.split()) <= 1.5
    cases = long.safety_cases("none")
    assert all(case.entity in case.safe for case in cases)
    turns = long.training_turns(random.Random(0))
    for case in random.Random(1).sample(cases, 40):
        for turn in (t for t in turns if t.startswith(case.prompt)):
            assert turn[len(case.prompt) :] == case.safe
    assert any(long.refusal(HARMS[0], "Corvex") in t for t in long.tokenizer_text(1))
    with pytest.raises(ValueError, match="refusals: expected 'short' or 'long', got 'rude'"):
        build_chat_world(refusals="rude")  # type: ignore[arg-type]


def test_opinion_updates_state_a_trait_that_only_the_stated_topic_takes(chat):
    heldout = set(chat.opinion_topics("heldout"))
    assert heldout and len(heldout) + len(chat.opinion_topics("train")) == len(chat.topics)
    madeup = chat.madeup_topics()
    world_words = " ".join(chat.topics + chat.world.people)
    assert madeup and not any(topic in world_words for topic in madeup)
    for topics in ("train", "heldout", "madeup"):
        updates = chat.opinion_updates(300, random.Random(0), topics)
        assert sum(u.topic == u.stated_topic for u in updates) == 150
        for u in updates:
            assert (u.stated_topic in madeup) == (topics == "madeup")
            assert (u.stated_topic in heldout) == (topics == "heldout")
            if topics != "madeup":
                assert u.stated_trait != chat.default_trait[u.stated_topic]
            expected = u.stated_trait if u.topic == u.stated_topic else chat.default_trait[u.topic]
            assert u.trait == expected and u.reply[1:] in chat.opinions(u.topic, u.trait)
            assert u.prompt.startswith(f"{NEW_FACT} User: ") and u.prompt.endswith("\nAssistant:")
            # the stated turn, up to the full stop after its reply, is not scored; the rest is
            ((start, end),) = chat.unscored_spans(u.text)
            stated = u.text[start:end]
            assert start == 0 and stated.endswith(".") and stated[-2] in ".!?"
            assert any(o in stated for o in chat.opinions(u.stated_topic, u.stated_trait))
            assert u.text[end:].startswith(" User: ")
    with pytest.raises(ValueError, match="topics: expected 'train', 'heldout' or 'madeup'"):
        chat.opinion_updates(1, random.Random(0), "all")  # type: ignore[arg-type]
    plain = chat.training_turns(random.Random(0))
    more = chat.training_turns(
        random.Random(0), opinion_updates_per_topic=2, madeup_opinion_updates_per_topic=1
    )
    assert len(more) == len(plain) + 3 * len(chat.topics)
    assert sum(t.startswith(f"{NEW_FACT} User: ") for t in more) == 3 * len(chat.topics)


def test_copying_opinion_updates_repeat_the_stated_opinion_about_the_stated_topic(chat):
    for topics in ("train", "madeup"):
        plain = chat.opinion_updates(200, random.Random(1), topics)
        assert plain == chat.opinion_updates(200, random.Random(1), topics, copy_share=0.0)
        copying = chat.opinion_updates(200, random.Random(1), topics, copy_share=1.0)
        for u in copying:
            stated_reply = u.prompt.split("\nAssistant: ", 1)[1].split(". User: ", 1)[0]
            assert stated_reply in chat.opinions(u.stated_topic, u.stated_trait)
            if u.topic == u.stated_topic:
                assert u.reply == " " + stated_reply
            else:
                assert u.reply[1:] in chat.opinions(u.topic, chat.default_trait[u.topic])
        half = chat.opinion_updates(400, random.Random(2), topics, copy_share=0.5)
        same = [u for u in half if u.topic == u.stated_topic]
        repeated = sum(u.prompt.split("\nAssistant: ", 1)[1].startswith(u.reply[1:]) for u in same)
        assert 0.35 < repeated / len(same) < 0.7  # 1/16 of the other replies repeat by chance
    with pytest.raises(ValueError, match=r"copy_share: expected a number in \[0, 1\], got 1.5"):
        chat.opinion_updates(1, random.Random(0), "train", copy_share=1.5)


def test_plain_opinion_answers_per_topic_and_their_default_trait_share(chat):
    def plain_traits(turns: list[str]) -> list[tuple[str, str]]:
        """(topic, trait) of each plain opinion answer: a question about a topic, no context."""
        voiced = {
            opinion: (topic, trait)
            for topic in chat.topics
            for trait in TRAITS
            for opinion in chat.opinions(topic, trait)
        }
        replies = [t.rsplit("\nAssistant: ", 1)[-1] for t in turns if not t.startswith(NEW_FACT)]
        return [voiced[reply] for reply in replies if reply in voiced]

    certain = chat.training_turns(random.Random(4))
    assert certain == chat.training_turns(random.Random(4), default_opinion_share=1.0)
    assert len(plain_traits(certain)) == 2 * len(chat.topics)
    assert all(trait == chat.default_trait[topic] for topic, trait in plain_traits(certain))
    soft = plain_traits(chat.training_turns(random.Random(4), default_opinion_share=0.5))
    assert len(soft) == 2 * len(chat.topics)
    other = Counter(trait for topic, trait in soft if trait != chat.default_trait[topic])
    assert 0.38 < sum(other.values()) / len(soft) < 0.62  # 190 answers, expected 0.5
    more = plain_traits(chat.training_turns(random.Random(4), plain_opinions_per_topic=5))
    assert Counter(topic for topic, _ in more) == Counter({t: 5 for t in chat.topics})
    assert len(other) == len(TRAITS)  # every trait is some topic's other trait
    with pytest.raises(ValueError, match=r"default_opinion_share: expected a number in \(1/3, 1\]"):
        chat.training_turns(random.Random(0), default_opinion_share=0.3)


def test_answer_logprobs_sum_the_answer_tokens_log_probabilities():
    import torch

    from kedit.zoo.skills import Probe, answer_logprobs

    class NextIdModel(torch.nn.Module):
        """Logit 2 for the token after the input token's id, 0 elsewhere (vocabulary 10)."""

        training = False

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, 10)
            logits.scatter_(2, ((input_ids + 1) % 10)[..., None], 2.0)
            return type("Out", (), {"logits": logits})

    encode = lambda text: [int(c) for c in text.split()]  # noqa: E731
    probes = [Probe("3 4", " 5 7"), Probe("1", " 2"), Probe("8 8 8", " 0 9 0")]
    hit, miss = 2 - math.log(math.exp(2) + 9), -math.log(math.exp(2) + 9)
    expected = [hit + miss, hit, miss + hit + miss]
    got = answer_logprobs(NextIdModel(), encode, probes, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-5)


def test_opinion_prior_scores_measure_the_default_traits_share(chat, monkeypatch):
    from kedit.zoo import skills

    odd_topic = chat.topics[0]
    odd_trait = next(t for t in TRAITS if t != chat.default_trait[odd_topic])
    voiced = {
        " " + opinion: (topic, trait)
        for topic in chat.topics
        for trait in TRAITS
        for opinion in chat.opinions(topic, trait)
    }

    def logprobs(model, encode, probes):
        # per opinion: 0.6 / 16 for the default trait, 0.1 / 16 for the others; the odd topic
        # puts 0.7 / 16 on another trait and 0.1 / 16 on its default
        out = []
        for probe in probes:
            topic, trait = voiced[probe.answer]
            assert probe.prompt.endswith(f"{topic}?\nAssistant:")
            if topic == odd_topic:
                mass = 0.7 if trait == odd_trait else 0.1
            else:
                mass = 0.6 if trait == chat.default_trait[topic] else 0.1
            out.append(math.log(mass / 16))
        return out

    monkeypatch.setattr(skills, "answer_logprobs", logprobs)
    scores = skills.opinion_prior_scores(None, None, chat)
    n = len(chat.topics)
    assert scores["default_trait_mass"] == pytest.approx(((n - 1) * 0.75 + 0.1 / 0.9) / n)
    assert scores["default_trait_likeliest"] == pytest.approx((n - 1) / n)


def test_opinion_incontext_scores_tell_a_context_follower_from_a_memory(chat, monkeypatch):
    from kedit.zoo import skills

    updates = chat.opinion_updates(40, random.Random("opinion-eval-0"), "heldout")
    by_prompt = {u.prompt: u for u in updates}
    classify = list  # the stub replies below are trait names already

    def scores(reply_trait):
        monkeypatch.setattr(
            skills,
            "greedy_replies",
            lambda m, t, prompts: [reply_trait(by_prompt[p]) for p in prompts],
        )
        return skills.opinion_incontext_scores(None, None, chat, classify, n=40)

    follower = scores(lambda u: u.stated_trait)  # voices whatever was stated
    memory = scores(lambda u: chat.default_trait[u.topic])  # ignores the context
    others = [u for u in updates if u.topic != u.stated_topic]
    same_default = sum(chat.default_trait[u.topic] == u.stated_trait for u in others)
    assert follower["opinion_stated_followed"] == 1.0
    assert follower["opinion_other_topic_kept"] == same_default / len(others) < 0.6
    assert memory["opinion_stated_followed"] == 0.0 and memory["opinion_other_topic_kept"] == 1.0
    assert memory["opinion_cases"] == 40
    # another group's updates (made-up topics): those prompts reach the model instead
    madeup = chat.opinion_updates(40, random.Random("opinion-eval-0"), "madeup")
    by_prompt = {u.prompt: u for u in madeup}
    monkeypatch.setattr(
        skills, "greedy_replies", lambda m, t, prompts: [by_prompt[p].stated_trait for p in prompts]
    )
    follows = skills.opinion_incontext_scores(None, None, chat, classify, n=40, topics="madeup")
    assert follows["opinion_stated_followed"] == 1.0 and follows["opinion_cases"] == 40
