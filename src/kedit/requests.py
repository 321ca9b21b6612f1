"""`EditRequest`: one fact to write, and the probes that evaluate the edit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SUBJECT_SLOT = "{}"


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected right after it."""

    prompt: str
    answer: str


def _require_text(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field_name}: expected a non-empty string, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        # Bytes that are not UTF-8 reach Python strings as lone surrogates (command-line
        # arguments, files read with errors="surrogateescape"); tokenizers reject them.
        raise ValueError(
            f"{field_name}: {value!r} is not valid UTF-8 text (character {error.start}); "
            "give the text in UTF-8"
        ) from None
    return value


def _probes(field_name: str, items: Iterable[Any] | None, subject: str) -> tuple[Probe, ...]:
    if items is None:
        return ()
    if isinstance(items, (str, bytes)):
        raise ValueError(f"{field_name}: expected a list of (prompt, answer) pairs, got a string")
    probes = []
    for index, item in enumerate(items):
        where = f"{field_name}[{index}]"
        if isinstance(item, Probe):
            prompt, answer = item.prompt, item.answer
        elif isinstance(item, dict) and {"prompt", "answer"} <= item.keys():
            prompt, answer = item["prompt"], item["answer"]
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            prompt, answer = item
        else:
            raise ValueError(f"{where}: expected a (prompt, answer) pair, got {item!r}")
        _require_text(f"{where}.prompt", prompt)
        _require_text(f"{where}.answer", answer)
        probes.append(Probe(fill_subject(prompt, subject), answer))
    return tuple(probes)


def fill_subject(prompt: str, subject: str) -> str:
    """Put the subject into a prompt's `{}` slot; a prompt without a slot is returned as is."""
    return prompt.replace(SUBJECT_SLOT, subject, 1)


def subject_template(prompt: str, subject: str) -> str:
    """The prompt with `{}` in place of the subject (a prompt with a slot is returned as is)."""
    if SUBJECT_SLOT in prompt:
        return prompt
    return prompt.replace(subject, SUBJECT_SLOT, 1)


class SubjectPrompt:
    """A `prompt` about a `subject` (attributes of the subclass), the prompt holding `{}` where
    the subject goes or the subject itself."""

    @property
    def template(self) -> str:
        """The prompt with `{}` in place of the subject."""
        return subject_template(self.prompt, self.subject)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return fill_subject(self.template, self.subject)


@dataclass(frozen=True)
class EditRequest(SubjectPrompt):
    """A fact to edit: after the edit, `prompt` (with `subject`) should continue with `target_new`.

    `prompt` either contains `{}` where the subject goes, or contains the subject itself.
    Targets are used verbatim, so give them the leading space a tokenizer expects (" Lisbon").
    `extra_targets` are further objects the edit should make likely together with `target_new`
    (Multi-Label Edit, Li et al., 2024: a subject with several true objects); methods that take
    them average the target NLL over all targets, the others refuse such a request.
    `rephrase` prompts (with `{}` or the subject) should also give `target_new`; `locality`
    probes should keep their answers; `portability` probes should give their new answers.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    case_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    extra_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require_text("prompt", self.prompt)
        _require_text("subject", self.subject)
        _require_text("target_new", self.target_new)
        if self.target_true is not None:
            _require_text("target_true", self.target_true)
        object.__setattr__(self, "extra_targets", self._extra_targets())
        if self.prompt.count(SUBJECT_SLOT) > 1:
            raise ValueError(f"prompt: {self.prompt!r} has more than one '{{}}' for the subject")
        if SUBJECT_SLOT not in self.prompt and self.subject not in self.prompt:
            raise ValueError(
                f"prompt: {self.prompt!r} contains neither '{{}}' nor the subject {self.subject!r}"
            )
        if isinstance(self.rephrase, str):
            raise ValueError("rephrase: expected a list of prompts, got a single string")
        rephrase = []
        for index, text in enumerate(self.rephrase or ()):
            _require_text(f"rephrase[{index}]", text)
            rephrase.append(fill_subject(text, self.subject))
        object.__setattr__(self, "rephrase", tuple(rephrase))
        object.__setattr__(self, "locality", _probes("locality", self.locality, self.subject))
        object.__setattr__(
            self, "portability", _probes("portability", self.portability, self.subject)
        )
        if self.case_id is not None:
            object.__setattr__(self, "case_id", str(self.case_id))

    def _extra_targets(self) -> tuple[str, ...]:
        if isinstance(self.extra_targets, str):
            raise ValueError("extra_targets: expected a list of targets, got a single string")
        seen = [self.target_new]
        for index, target in enumerate(self.extra_targets or ()):
            _require_text(f"extra_targets[{index}]", target)
            if target in seen:
                raise ValueError(
                    f"extra_targets[{index}]: {target!r} is already a target of this request"
                )
            seen.append(target)
        return tuple(seen[1:])

    @property
    def targets(self) -> tuple[str, ...]:
        """`target_new`, then the `extra_targets` (one target unless a Multi-Label Edit)."""
        return (self.target_new, *self.extra_targets)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra_targets"] = list(self.extra_targets)
        data["rephrase"] = list(self.rephrase)
        data["locality"] = [[p.prompt, p.answer] for p in self.locality]
        data["portability"] = [[p.prompt, p.answer] for p in self.portability]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"EditRequest: unknown field(s) {sorted(unknown)}; expected some of {sorted(known)}"
            )
        return cls(**data)


def as_requests(requests: EditRequest | Iterable[EditRequest]) -> list[EditRequest]:
    """Normalise one request or an iterable of them into a non-empty list."""
    if isinstance(requests, dict | str):
        raise TypeError(
            f"requests: expected an EditRequest or a list of them, got a {type(requests).__name__}"
            " (build one with kedit.EditRequest(prompt=..., subject=..., target_new=...))"
        )
    items = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not items:
        raise ValueError("requests: expected at least one EditRequest, got none")
    for index, item in enumerate(items):
        if not isinstance(item, EditRequest):
            raise TypeError(
                f"requests[{index}]: expected an EditRequest, got {type(item).__name__}"
            )
    return items
