"""PersonalityEdit's metrics (Mao et al., 2023, §4) and the loop that measures a method on its
cases, each case edited on its own, measured, and undone. The model is asked PersonalityEdit's
question about the topic ("What do you think of {topic}?", as a chat turn where it has a
template).

- **ES** (Edit Success), protocol `probability`: after the edit, the target trait's opinion
  texts about the topic are the most likely of the three traits' (mean per-token NLL of each
  text as the reply, averaged over the trait's texts).
- **DD** (Drawdown), protocol `probability`: KL(P_pre ‖ P_post) of the next-token distributions
  at the reply positions of other topics' opinion texts (every trait's), averaged; 0 when the
  edit leaves other topics alone.
- **Acc**, protocol `generation`: the greedy reply about the topic is judged (the personality
  judge) to voice the target trait.
- **TPEI** (Target Personality Edit Index), protocol `generation`: −(CE_post − CE_pre), CE the
  judge's cross-entropy −log P(target | reply) of the reply about the topic; positive when the
  reply moved towards the target. Only with a judge that gives probabilities (the bundled ones
  do); otherwise absent.
- PAE (GPT-4 rated personality adherence) needs a judge model kedit does not run offline: not
  reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from statistics import mean
from typing import Any

import torch

from kedit.data.personalityedit import QUESTION, TRAITS, PersonalityCase
from kedit.edits import Edit
from kedit.eval.chat import as_chat, has_chat_template, replies, turn_end
from kedit.eval.judges import Judge
from kedit.eval.protocols import GENERATION, PROBABILITY, prompt_ids
from kedit.lm import LM, require_lm
from kedit.requests import EditRequest

PROTOCOLS = {"ES": PROBABILITY, "DD": PROBABILITY, "Acc": GENERATION, "TPEI": GENERATION}


def edit_success(trait_nll: dict[str, float], target: str) -> bool:
    """Whether the target trait's texts are the most likely (lowest mean NLL) of the traits."""
    if target not in trait_nll:
        raise ValueError(f"target: {target!r} is not one of {', '.join(trait_nll)}")
    return all(trait_nll[target] < nll for trait, nll in trait_nll.items() if trait != target)


def target_cross_entropy(
    probabilities: Sequence[float], labels: Sequence[str], target: str
) -> float:
    """−log P(target) from a judge's label probabilities."""
    return -math.log(max(float(probabilities[list(labels).index(target)]), 1e-12))


class PersonalityRun:
    """Measures one model on PersonalityEdit cases."""

    def __init__(self, lm: LM, judge: Judge, max_new_tokens: int = 48, n_other: int = 3) -> None:
        if judge.kind != "personality":
            raise ValueError(f"judge: expected a personality judge, got a {judge.kind} judge")
        if not isinstance(n_other, int) or n_other < 0:
            raise ValueError(f"n_other: expected an integer >= 0, got {n_other!r}")
        self.lm, self.judge = require_lm(lm), judge
        self.max_new_tokens, self.n_other = max_new_tokens, n_other
        self.stop = turn_end(lm) if has_chat_template(lm) else None

    def prompt(self, case: PersonalityCase) -> str:
        return as_chat(self.lm, QUESTION.format(case.topic))

    @torch.no_grad()
    def reply_logp(self, prompt: str, texts: Sequence[str]) -> list[torch.Tensor]:
        """Per text, the log-probabilities [T, V] at the positions that predict its tokens (the
        text as the reply, after a space)."""
        lm = self.lm
        head = prompt_ids(lm, prompt)
        rows = [head + lm.encode(" " + text) for text in texts]
        ids, mask = lm.pad(rows)
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        return [logp[row, len(head) - 1 : len(ids_) - 1] for row, ids_ in enumerate(rows)]

    def trait_nll(self, case: PersonalityCase) -> dict[str, float]:
        """Each trait's texts' mean per-token NLL as the reply about the case's topic."""
        prompt, out = self.prompt(case), {}
        for trait in TRAITS:
            texts = case.texts[trait]
            logps = self.reply_logp(prompt, texts)
            targets = [self.lm.encode(" " + text) for text in texts]
            out[trait] = mean(
                -float(logp.gather(1, torch.tensor([t], device=logp.device).T).mean())
                for logp, t in zip(logps, targets, strict=True)
            )
        return out

    def others(self, cases: Sequence[PersonalityCase], index: int) -> list[PersonalityCase]:
        """The `n_other` cases after case `index` (cyclically): the topics DD watches."""
        count = min(self.n_other, len(cases) - 1)
        return [cases[(index + k) % len(cases)] for k in range(1, count + 1)]

    def distributions(self, case: PersonalityCase) -> list[torch.Tensor]:
        texts = [text for trait in TRAITS for text in case.texts[trait]]
        return self.reply_logp(self.prompt(case), texts)

    def opinion(self, case: PersonalityCase) -> str:
        return replies(self.lm, [self.prompt(case)], self.max_new_tokens, self.stop)[0]

    def target_ce(self, reply: str, target: str) -> float | None:
        probabilities = getattr(self.judge.classify, "probabilities", None)
        labels = getattr(self.judge.classify, "labels", None)
        if probabilities is None or labels is None:
            return None
        return target_cross_entropy(probabilities([reply])[0].tolist(), labels, target)


def drawdown(pre: Sequence[torch.Tensor], post: Sequence[torch.Tensor]) -> float:
    """Mean over texts of the mean over positions of KL(P_pre ‖ P_post) (log-probabilities in)."""
    return mean(float((a.exp() * (a - b)).sum(-1).mean()) for a, b in zip(pre, post, strict=True))


IKE_TEXTS = ("shortest", "all")


def check_ike_texts(texts: str) -> str:
    """`texts` if it names what IKE states (`IKE_TEXTS`); a ValueError naming it otherwise."""
    if texts not in IKE_TEXTS:
        raise ValueError(f"ike_texts: expected one of {', '.join(IKE_TEXTS)}, got {texts!r}")
    return texts


def stating_ike_texts(
    lm: LM, method: str, texts: str, make_edit: Callable[[list[EditRequest]], Edit]
) -> Callable[[list[EditRequest]], Edit]:
    """`make_edit` as it edits a case: given every target-trait text, or, for IKE with `texts`
    'shortest', the case's shortest (in tokens) only. IKE states its requests before the
    question, and all of a case's texts with the question and the scored reply take more than a
    short model's positions (137 of tiny-chat's 128)."""
    if method != "ike" or check_ike_texts(texts) == "all":
        return make_edit
    return lambda requests: make_edit([min(requests, key=lambda r: len(lm.encode(r.target_new)))])


def evaluate_personality(
    lm: LM,
    cases: Iterable[PersonalityCase],
    judge: Judge,
    make_edit: Callable[[list[EditRequest]], Edit] | None = None,
    max_new_tokens: int = 48,
    n_other: int = 3,
) -> dict[str, Any]:
    """PersonalityEdit's metrics of `lm` on the cases, unedited and, with `make_edit` (which edits
    `lm` for one case's requests, see `PersonalityCase.requests`, and returns the applied Edit),
    after each case's own edit, undone before the next."""
    cases = list(cases)
    if not cases:
        raise ValueError("cases: expected at least one PersonalityEdit case, got none")
    run = PersonalityRun(lm, judge, max_new_tokens, n_other)
    unedited = {case.case_id: run.distributions(case) for case in cases}
    records = []
    for index, case in enumerate(cases):
        before = run.opinion(case)
        record: dict[str, Any] = {
            "case_id": case.case_id,
            "topic": case.topic,
            "target": case.target,
            "pre": _stage(run, case, before),
        }
        if make_edit is not None:
            edit = make_edit(case.requests(run.prompt(case)))
            try:
                after = run.opinion(case)
                record["post"] = _stage(run, case, after)
                others = run.others(cases, index)
                if others:
                    record["post"]["DD"] = mean(
                        drawdown(unedited[o.case_id], run.distributions(o)) for o in others
                    )
                pre_ce, post_ce = record["pre"]["target_ce"], record["post"]["target_ce"]
                if pre_ce is not None:
                    record["post"]["TPEI"] = -(post_ce - pre_ce)
                record["edit_info"] = edit.info
            finally:
                edit.undo()
        records.append(record)
    return {
        "judge": judge.name,
        "n_other": n_other,
        "summary": summarize_personality(records, judge.name),
        "cases": records,
    }


def _stage(run: PersonalityRun, case: PersonalityCase, reply: str) -> dict[str, Any]:
    nll = run.trait_nll(case)
    return {
        "trait_nll": nll,
        "ES": edit_success(nll, case.target),
        "reply": reply,
        "verdict": run.judge([reply])[0],
        "target_ce": run.target_ce(reply, case.target),
    }


def summarize_personality(records: Sequence[dict[str, Any]], judge: str) -> dict[str, Any]:
    """Pre and post means over cases, each metric with its protocol (and judge where judged)."""
    out: dict[str, Any] = {"n_cases": len(records)}
    for stage in ("pre", "post"):
        rows = [(r[stage], r["target"]) for r in records if stage in r]
        if not rows:
            continue
        values = {
            "ES": [float(row["ES"]) for row, _ in rows],
            "Acc": [float(row["verdict"] == target) for row, target in rows],
            "DD": [row["DD"] for row, _ in rows if "DD" in row],
            "TPEI": [row["TPEI"] for row, _ in rows if "TPEI" in row],
        }
        out[stage] = {
            name: {
                "value": round(mean(found), 4),
                "protocol": PROTOCOLS[name],
                "n": len(found),
                **({"judge": judge} if PROTOCOLS[name] == GENERATION else {}),
            }
            for name, found in values.items()
            if found
        }
    return out
