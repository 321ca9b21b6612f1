"""Asking chat models: a user turn through the tokenizer's chat template, and greedy replies
cut where the template ends the assistant's turn (the safety and personality metrics ask so)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from kedit.eval.protocols import fitting_prompt_ids
from kedit.lm import LM
from kedit.requests import EditRequest

_CONTENT = "\x00reply\x00"


def has_chat_template(lm: LM) -> bool:
    return bool(getattr(lm.tokenizer, "chat_template", None))


def as_chat(lm: LM, text: str) -> str:
    """`text` as the user's turn of a dialogue, up to the assistant's reply (the text itself
    for a model without a chat template)."""
    if not has_chat_template(lm):
        return text
    turn = [{"role": "user", "content": text}]
    return lm.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def turn_end(lm: LM) -> str | None:
    """What the chat template writes after an assistant's reply (tiny-chat: a newline), or None
    without a template: where a generated reply ends."""
    if not has_chat_template(lm):
        return None
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _CONTENT}]
    text = lm.tokenizer.apply_chat_template(turns, tokenize=False)
    after = text.split(_CONTENT, 1)[1] if _CONTENT in text else ""
    return after.strip() or after or None


def chat_request(lm: LM, request: EditRequest, chat: bool) -> EditRequest:
    """The request with its prompt and locality prompts as chat turns (unchanged if not `chat`)."""
    if not chat:
        return request
    return dataclasses.replace(
        request,
        prompt=as_chat(lm, request.text),
        locality=[(as_chat(lm, p.prompt), p.answer) for p in request.locality],
    )


@torch.no_grad()
def replies(lm: LM, prompts: Sequence[str], max_new_tokens: int, stop: str | None) -> list[str]:
    """Greedy replies (with a KV cache), cut where the chat template ends a turn, and where the
    model's context ends (a reply to a prompt that fills the context is empty).

    Prompts of one token length are decoded together, so no padding enters any position."""
    encoded = [fitting_prompt_ids(lm, prompt) for prompt in prompts]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    stops = {"stop_strings": [stop], "tokenizer": lm.tokenizer} if stop else {}
    texts = [""] * len(prompts)
    for length, group in by_length.items():
        budget = lm.new_token_budget(length, max_new_tokens)
        if budget <= 0:
            continue
        ids = torch.tensor([encoded[i] for i in group], device=lm.device)
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=lm.tokenizer.eos_token_id,
            **stops,
        )
        for row, index in enumerate(group):
            text = lm.tokenizer.decode(out[row, length:].tolist(), skip_special_tokens=True)
            texts[index] = text.split(stop, 1)[0] if stop else text
    return texts
