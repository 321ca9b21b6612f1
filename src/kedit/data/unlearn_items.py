"""`UnlearnItem`: a prompt and the answer to forget or keep, and kedit's plain file of them.

The plain format is one JSON object per line (or a JSON array of them) with `prompt` and
`answer`, and optionally `perturbed_answer` (wrong answers, for TOFU's truth ratio) and
`paraphrased_answer`; other fields (`subject`, `relation`, ...) are allowed and ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from kedit.data._common import Record, records_reader, with_space
from kedit.requests import Probe


@dataclass(frozen=True)
class UnlearnItem:
    """A prompt and its answer: the model reads `prompt + answer`, and unlearning methods and
    metrics use the answer tokens only. `perturbed` holds wrong answers and
    `paraphrased_answer` a rewording of the answer (TOFU's truth ratio compares them; the
    answer itself stands in for a missing paraphrase)."""

    prompt: str
    answer: str
    perturbed: tuple[str, ...] = ()
    paraphrased_answer: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        if isinstance(self.perturbed, str) or not all(
            isinstance(a, str) and a.strip() for a in self.perturbed
        ):
            raise ValueError(
                f"perturbed: expected a list of non-empty strings, got {self.perturbed!r}"
            )
        object.__setattr__(self, "perturbed", tuple(self.perturbed))
        if self.paraphrased_answer is not None and not (
            isinstance(self.paraphrased_answer, str) and self.paraphrased_answer.strip()
        ):
            raise ValueError(
                f"paraphrased_answer: expected a non-empty string or None, got "
                f"{self.paraphrased_answer!r}"
            )

    @property
    def pair(self) -> tuple[str, str]:
        return self.prompt, self.answer


def as_items(value: Any, field: str) -> list[UnlearnItem]:
    """`value` as a non-empty list of UnlearnItems: it may hold UnlearnItems, `Probe`s,
    (prompt, answer) pairs or `{"prompt", "answer"}` dicts. Errors name `field[index]`."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise ValueError(
            f"{field}: expected a list of (prompt, answer) pairs or UnlearnItems, got "
            f"{type(value).__name__}"
        )
    items = []
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        try:
            if isinstance(item, UnlearnItem):
                items.append(item)
            elif isinstance(item, Probe):
                items.append(UnlearnItem(item.prompt, item.answer))
            elif isinstance(item, dict) and {"prompt", "answer"} <= item.keys():
                items.append(UnlearnItem(item["prompt"], item["answer"]))
            elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
                items.append(UnlearnItem(*item))
            else:
                raise ValueError(f"expected a (prompt, answer) pair, got {item!r:.80}")
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    if not items:
        raise ValueError(f"{field}: expected at least one item, got none")
    return items


def record_item(prompt_key: str, record: Record, add_space: bool) -> UnlearnItem:
    """The item of a record whose prompt is field `prompt_key` (plain files: "prompt"; TOFU:
    "question"), with `answer` and the optional `perturbed_answer`, `paraphrased_answer`."""
    paraphrased = record.get("paraphrased_answer", str, default=None)
    return UnlearnItem(
        record.get(prompt_key),
        with_space(record.get("answer"), add_space),
        perturbed=tuple(with_space(a, add_space) for a in record.strings("perturbed_answer")),
        paraphrased_answer=None if paraphrased is None else with_space(paraphrased, add_space),
    )


plain_items = records_reader(
    "plain",
    partial(record_item, "prompt"),
    "Unlearning items of kedit's plain file (`prompt`, `answer` per row).",
)


def item_pairs(items: Sequence[UnlearnItem]) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of `items`."""
    return [item.pair for item in items]
