import pytest
from hypothesis import given
from hypothesis import strategies as st

from kedit import EditRequest, Probe
from kedit.requests import as_requests

text = st.text(min_size=1).filter(lambda s: s.strip() and "{}" not in s)


def test_prompt_with_slot_or_subject_gives_same_text():
    a = EditRequest(prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo")
    b = EditRequest(prompt="Mira Olsen lives in", subject="Mira Olsen", target_new=" Oslo")
    assert a.text == b.text == "Mira Olsen lives in"
    assert a.template == b.template == "{} lives in"


def test_probes_are_normalised_and_filled():
    req = EditRequest(
        prompt="{} lives in",
        subject="Mira Olsen",
        target_new=" Oslo",
        rephrase=["{} resides in"],
        locality=[("Tomas Berg lives in", " Rome"), {"prompt": "A is", "answer": " B"}],
        portability=[Probe("{} lives in the country of", " Norway")],
    )
    assert req.rephrase == ("Mira Olsen resides in",)
    assert req.locality[1] == Probe("A is", " B")
    assert req.portability[0].prompt == "Mira Olsen lives in the country of"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "Somebody lives in"}, "prompt"),
        ({"target_new": ""}, "target_new"),
        ({"target_new": "   "}, "target_new"),
        ({"subject": ""}, "subject"),
        ({"target_true": 3}, "target_true"),
        ({"rephrase": "{} resides in"}, "rephrase"),
        ({"rephrase": ["ok {}", ""]}, "rephrase[1]"),
        ({"locality": [("only a prompt",)]}, "locality[0]"),
        ({"locality": [("prompt", "")]}, "locality[0].answer"),
        ({"portability": "x"}, "portability"),
        ({"prompt": "{} and {} live in"}, "more than one"),
    ],
)
def test_bad_fields_are_named(kwargs, field):
    base = {"prompt": "{} lives in", "subject": "Mira Olsen", "target_new": " Oslo"}
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        EditRequest(**{**base, **kwargs})


@given(subject=text, target=text, tail=text)
def test_any_nonempty_strings_make_a_valid_request(subject, target, tail):
    req = EditRequest(prompt="{} " + tail, subject=subject, target_new=target)
    assert req.text == f"{subject} {tail}"
    assert EditRequest.from_dict(req.to_dict()) == req


@given(target=st.sampled_from(["", " ", "\n", "\t "]))
def test_blank_targets_are_refused(target):
    with pytest.raises(ValueError, match="target_new"):
        EditRequest(prompt="{} is", subject="x", target_new=target)


def test_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="colour"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "x", "target_new": " y", "colour": 1})


def test_as_requests():
    req = EditRequest(prompt="{} is", subject="x", target_new=" y")
    assert as_requests(req) == [req]
    with pytest.raises(ValueError, match="at least one"):
        as_requests([])
    with pytest.raises(TypeError, match=r"requests\[1\]"):
        as_requests([req, "nope"])
    with pytest.raises(TypeError, match="got a dict"):
        as_requests({"prompt": "{} is", "subject": "x", "target_new": " y"})
