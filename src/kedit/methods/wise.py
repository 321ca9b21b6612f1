"""WISE: a side memory beside one FFN value matrix, with activation routing (Wang et al., 2024).

The main memory, the FFN's value matrix W (the MLP output projection of one layer by default),
never changes. Edits go to a side memory W' = W + Δ, kept as Δ. A token reads the side memory
where its activation score Δ_act = ‖a Δ‖ (a: the token's input to W) exceeds the threshold ε;
elsewhere the layer is as before. kedit routes every token on its own (each token's output
depends on its own activation only, so padding or batching never changes a result).

Editing trains Δ with the edit's target NLL plus the routing margin loss (the paper's L_a)
L_a = max(0, Δ_act(x_i) − α) + max(0, β − Δ_act(x_e)) + max(0, γ − (Δ_act(x_e) − Δ_act(x_i))),
averaged over irrelevant texts x_i (sentences of the model's corpus), Δ_act(x_e) the smallest
score over the positions that predict the target and Δ_act(x_i) the largest over the text's
tokens. ε is `act_ratio` times the smallest edit score seen by the shard. Training stops at
`steps`, or once the target NLL is below `stop_nll` and the routing holds (act_ratio × the
edit's score above every irrelevant token's score).

Knowledge sharding: the side memory holds shards Δ_s, each trained through its own random
mask M_s (a share `mask_ratio` of the entries; Δ_s = clamp(Δ_s + M_s ⊙ P)). An edit goes to the
newest shard, a new shard starts every `shard_size` edits; a token reads the shard with the
largest score if that passes the shard's ε (WISE-Retrieve). With `merge_every`, every that many
edits the live shards are merged into one with TIES (trim each to the `merge_density` largest
entries, elect each entry's sign by the summed mass, average the entries that agree:
WISE-Merge; the merged shards are retired). With `replay` (an option of EasyEdit's WISE), an
edit trains together with the earlier edits of its shard (their target NLL and margins), and ε
covers all of them as they score now: on small value matrices, training a shard for a new edit
otherwise overwrites its earlier ones (docs/tuning.md#wise). The memory keeps the edits' token
ids for that. It grows edit by edit (`MemoryDelta`); the weights never change.

With `negatives` (kedit's, not the paper's), retrieval among many shards is trained too: that
many edits of other shards count as irrelevant texts (scored where they predict their targets),
and the margin loss adds max(0, γ + s_other − Δ_act(x_e)) at each of the shard's edit positions,
s_other the highest score another shard gives there; training stops only once they outscore
it. Without it a newer shard takes over an earlier edit's tokens, or an older one a newer's
(docs/tuning.md#wise).

With `near_misses` (kedit's too), that many near misses of the edit prompt count as irrelevant
texts: the prompt about a name one token away from the subject, that token taken from an
earlier edit's subject at the same position ("Sofia Bramnik" for "Sofia Bramez" after an edit of
"Kira Kelnik"). A model that reads a name token by token gives such a prompt nearly the edit's
activation, and without them the router takes it (docs/tuning.md#wise). The memory keeps the
subjects it has edited for that.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from kedit.edits import (
    Adaptor,
    Change,
    MemoryDelta,
    find_memory,
    register_adaptor,
)
from kedit.lm import LM
from kedit.methods._train import (
    Row,
    check_positive,
    check_site,
    edit_one_by_one,
    memory_tensors,
    module_inputs,
    module_path,
    request_row,
    train_at_module,
)
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest, fill_subject
from kedit.stats import default_corpus, read_corpus

IRRELEVANT_MAX_TOKENS = 32


def shard_changes(inputs: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Each shard's change of the output at each input, `[S, m, out]` for inputs `[m, in]` and
    shards `[S, in, out]`; its norm is the shard's activation score Δ_act there."""
    return torch.einsum("mi,sio->smo", inputs, deltas)


@register_adaptor
class SideMemory(Adaptor):
    """WISE's side memory: shards `deltas [S, in, out]` (W' − W, mapping a token's input to the
    change of its output), their thresholds `[S]` and edit counts `[S]`; and the edits it holds
    (for replay): their token ids, one after the other (`tokens [T]`), and for each its shard,
    prompt length and target length (`edits [n, 3]`); and each subject it has edited, once (for
    near misses): UTF-8 bytes one after the other (`subject_bytes`) and their sizes
    (`subject_sizes`)."""

    kind = "wise"

    def adapt(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        flat = inputs.reshape(-1, inputs.shape[-1]).to(self.deltas.dtype)
        changes = shard_changes(flat, self.deltas)
        best, shard = changes.norm(dim=-1).max(0)
        routed = best > self.thresholds[shard]
        if not routed.any():
            return output
        chosen = changes[shard, torch.arange(len(flat), device=flat.device)] * routed[:, None]
        return output + chosen.reshape(output.shape).to(output.dtype)


@dataclass
class WISEHyperParams(HyperParams):
    layers: list[int] = hp([27], "The one layer whose value matrix gets the side memory.")
    module: str = hp("mlp_out", "The Layout role of that matrix: mlp_in, mlp_out or attn_out.")
    lr: float = hp(1.0, "Gradient descent step size of the side memory.")
    steps: int = hp(70, "Maximum optimisation steps per edit.")
    stop_nll: float = hp(0.05, "Stop once the target NLL is below this and the margins hold.")
    norm_constraint: float = hp(1.0, "Each entry of W' − W stays within ± this.")
    act_margin: list[float] = hp([5.0, 20.0, 10.0], "α, β, γ of the margin loss L_a.")
    act_ratio: float = hp(0.88, "ε = act_ratio × the smallest edit score of the shard.")
    mask_ratio: float = hp(0.2, "Share of the side memory's entries each shard trains.")
    shard_size: int = hp(500, "Edits per shard; then a new shard starts (save_freq).")
    merge_every: int = hp(0, "Merge the live shards with TIES every this many edits (0: never).")
    merge_density: float = hp(0.53, "TIES: share of each shard's largest entries kept.")
    irrelevant: int = hp(4, "Irrelevant texts per edit, for the margin loss.")
    negatives: int = hp(
        0,
        "Edits of other shards per edit that count as irrelevant texts (at their target"
        " positions), and the edit's tokens must outscore every other shard by γ: so that"
        " retrieval hands each edit's tokens to its own shard (0: the paper's WISE).",
    )
    near_misses: int = hp(
        0,
        "Near misses of the edit prompt per edit that count as irrelevant texts: its subject"
        " with one token swapped for an earlier edited subject's token at that position, so"
        " that a name that merely shares tokens with the subject is not routed (0: the paper's"
        " WISE).",
    )
    irrelevant_corpus: str | None = hp(None, "Their corpus (None: the model's default corpus).")
    replay: bool = hp(False, "Train each edit with the earlier edits of its shard (replay).")
    seed: int = hp(0, "Seed of the shards' masks and of the irrelevant texts.")

    ALIASES = {
        "edit_lr": "lr",
        "n_iter": "steps",
        "save_freq": "shard_size",
        "merge_freq": "merge_every",
        "densities": "merge_density",
    }
    # EasyEdit's switches of what kedit does one way: the objective on the target tokens only,
    # TIES as the merge, retrieval among the live shards; `inner_params` is the
    # Layout's module at `layers`.
    IGNORED = HyperParams.IGNORED | {
        "inner_params",
        "objective_optimization",
        "merge_alg",
        "retrieve",
        "weights",
        "batch_size",
    }

    def validate(self) -> None:
        check_site(self.layers, self.module, "WISE's side memory")
        if len(self.act_margin) != 3 or not all(m >= 0 for m in self.act_margin):
            raise ValueError(f"act_margin: expected [α, β, γ] >= 0, got {self.act_margin!r}")
        for name in ("act_ratio", "mask_ratio", "merge_density"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(
                    f"{name}: expected a number in (0, 1], got {getattr(self, name)!r}"
                )
        check_positive(self, ("steps", "shard_size", "irrelevant"), ("lr", "norm_constraint"))
        for name in ("negatives", "near_misses"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        if self.merge_every < 0:
            raise ValueError(f"merge_every: expected 0 (never) or more, got {self.merge_every!r}")


def shard_mask(shape: tuple[int, ...], ratio: float, seed: int, shard: int) -> torch.Tensor:
    """Shard `shard`'s random mask M_s: a share `ratio` of the entries, the same at every call."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    return torch.rand(shape, generator=generator) < ratio


def ties_merge(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """TIES merging (Yadav et al., 2023) of task vectors `[S, ...]` into one: keep each vector's
    `density` share of largest entries, elect each entry's sign by the sum of the kept entries,
    and average the kept entries of that sign."""
    flat = deltas.reshape(len(deltas), -1)
    kept = max(1, math.ceil(density * flat.shape[1]))
    cutoff = flat.abs().topk(kept, dim=1).values[:, -1:]
    trimmed = torch.where(flat.abs() >= cutoff, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.reshape(deltas.shape[1:])


def irrelevant_texts(lm: LM, hparams: WISEHyperParams, request: EditRequest) -> list[str]:
    """`irrelevant` sentences of the corpus that do not name the request's subject, the same for
    a request at every call."""
    corpus = hparams.irrelevant_corpus or default_corpus(lm)
    key = ("wise-sentences", corpus)
    if key not in lm.cache:
        _, docs = read_corpus(corpus)
        parts = (part.strip() for doc in docs for part in doc.split(". "))
        lm.cache[key] = sorted({part for part in parts if len(part) > 3})
    sentences = lm.cache[key]
    rng = random.Random(f"{hparams.seed}|{request.text}")
    picked: list[str] = []
    for _ in range(50 * hparams.irrelevant):
        sentence = rng.choice(sentences)
        if request.subject not in sentence and sentence not in picked:
            picked.append(sentence)
            if len(picked) == hparams.irrelevant:
                break
    return picked


def one_token_away(subject: list[int], pool: list[list[int]]) -> list[list[int]]:
    """Token ids one token away from `subject`: each of its tokens replaced by the token at the
    same position of a `pool` subject as long as it, each variant once, in pool order."""
    seen = {tuple(subject)}
    variants = []
    for other in pool:
        if len(other) != len(subject):
            continue
        for position, token in enumerate(other):
            variant = (*subject[:position], token, *subject[position + 1 :])
            if variant not in seen:
                seen.add(variant)
                variants.append(list(variant))
    return variants


def near_miss_texts(
    lm: LM, hparams: WISEHyperParams, request: EditRequest, subjects: list[str]
) -> list[str]:
    """`near_misses` of the request's prompt about names one token away from its subject, the
    tokens taken from the edited `subjects` (the same for a request at every call)."""
    if not hparams.near_misses:
        return []
    mine, *pool = lm.encode_many([request.subject, *subjects])
    names = [lm.tokenizer.decode(ids) for ids in one_token_away(mine, pool)]
    names = [name for name in dict.fromkeys(names) if name != request.subject]
    rng = random.Random(f"{hparams.seed}|near|{request.text}")
    picked = rng.sample(names, min(hparams.near_misses, len(names)))
    return [fill_subject(request.template, name) for name in picked]


def held_subjects(buffers: dict[str, torch.Tensor]) -> list[str]:
    """The subjects a memory has edited, oldest first (UTF-8 bytes one after the other)."""
    data = bytes(buffers["subject_bytes"].tolist())
    ends = buffers["subject_sizes"].cumsum(0).tolist()
    return [data[start:end].decode() for start, end in zip([0, *ends][:-1], ends, strict=True)]


def margin_loss(
    edit_scores: torch.Tensor, irrelevant_maxima: torch.Tensor, margins: list[float]
) -> torch.Tensor:
    """L_a averaged over the irrelevant texts: the edit's score is its smallest, a text's its
    largest (`irrelevant_maxima`, one per text)."""
    alpha, beta, gamma = margins
    edit = edit_scores.min()
    terms = (
        torch.relu(irrelevant_maxima - alpha)
        + torch.relu(beta - edit)
        + torch.relu(gamma - (edit - irrelevant_maxima))
    )
    return terms.mean()


def segment_maxima(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The largest of each consecutive segment of `values` (`sizes` long each), in one gather:
    a loop over hundreds of texts would cost more than the scores themselves."""
    width = max(sizes)
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    offsets = torch.arange(width)
    index = starts[:, None] + offsets[None]
    index = torch.where(offsets[None] < torch.tensor(sizes)[:, None], index, len(values))
    padded = torch.cat([values, values.new_full((1,), -math.inf)])
    return padded[index.to(values.device)].max(dim=1).values


def memory_rows(memory: Adaptor | None) -> list[tuple[int, Row]]:
    """The training rows of the edits the memory holds, oldest first, each with its shard."""
    if memory is None:
        return []
    lengths = memory.edits[:, 1:].sum(1).tolist()
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    tokens = memory.tokens.tolist()
    rows = []
    for index, (owner, prompt, target) in enumerate(memory.edits.tolist()):
        ids = tokens[offsets[index] : offsets[index] + prompt + target]
        row = (ids[:-1], list(range(prompt - 1, prompt + target - 1)), ids[prompt:])
        rows.append((owner, row))
    return rows


def shard_rows(held: list[tuple[int, Row]], shard: int) -> list[Row]:
    """Of the memory's rows (`memory_rows`), those of the edits shard `shard` holds."""
    return [row for owner, row in held if owner == shard]


def other_shards_rows(
    held: list[tuple[int, Row]], shard: int, count: int, request: EditRequest, seed: int
) -> list[Row]:
    """Of the memory's rows (`memory_rows`), up to `count` of edits held by shards other than
    `shard`, drawn without repeats (the same for a request at every call)."""
    rows = [row for owner, row in held if owner != shard]
    if len(rows) <= count:
        return rows
    return random.Random(f"{seed}|negatives|{request.text}").sample(rows, count)


def _empty(shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The memory's buffers before the first edit."""
    return {
        "deltas": torch.zeros((0, *shape)),
        "thresholds": torch.zeros(0),
        "counts": torch.zeros(0, dtype=torch.long),
        "tokens": torch.zeros(0, dtype=torch.long),
        "edits": torch.zeros((0, 3), dtype=torch.long),
        "subject_bytes": torch.zeros(0, dtype=torch.uint8),
        "subject_sizes": torch.zeros(0, dtype=torch.long),
    }


def edit_one(lm: LM, request: EditRequest, hparams: WISEHyperParams) -> tuple[list[Change], dict]:
    """The side memory change for one request: its shard trained towards the target (with the
    shard's earlier edits, where `replay` is on), its threshold set to cover them, a new shard or
    a merge where due."""
    path = module_path(lm, hparams.module, hparams.layers[0])
    weight = lm.model.get_submodule(path).weight
    shape = lm.layout.in_out(weight)
    device = weight.device
    memory = find_memory(lm.model.get_submodule(path), SideMemory.kind)
    after = memory_tensors(memory, _empty(shape))
    shards = len(after["counts"])
    new_shard = shards == 0 or int(after["counts"][-1]) >= hparams.shard_size
    shard = shards if new_shard else shards - 1
    base = torch.zeros(shape) if new_shard else after["deltas"][shard]
    base, mask = base.to(device), shard_mask(shape, hparams.mask_ratio, hparams.seed, shard)
    mask = mask.to(device)

    row = request_row(lm, request)
    held = memory_rows(memory)
    subjects = held_subjects(after)
    replayed = shard_rows(held, shard) if hparams.replay and not new_shard else []
    edit_rows = [row, *replayed]
    near = near_miss_texts(lm, hparams, request, subjects)
    texts = [
        lm.encode_prompt(text)[:IRRELEVANT_MAX_TOKENS]
        for text in irrelevant_texts(lm, hparams, request) + near
    ]
    # Other shards' edits, scored where they predict their targets, count as irrelevant texts:
    # so that retrieval does not hand their tokens to this shard.
    negatives = other_shards_rows(held, shard, hparams.negatives, request, hparams.seed)
    # Every row's inputs at the side memory in one pass: the edits' at the positions that
    # predict their targets, each irrelevant text's at every token, each negative's as an edit.
    rows = [r[0] for r in edit_rows] + texts + [r[0] for r in negatives]
    positions = (
        [r[1] for r in edit_rows]
        + [list(range(len(ids))) for ids in texts]
        + [r[1] for r in negatives]
    )
    every_input = module_inputs(lm, path, rows, positions).to(device)
    sizes = [sum(len(r[1]) for r in edit_rows)] + [
        len(where) for where in positions[len(edit_rows) :]
    ]
    edit_inputs = every_input[: sizes[0]]
    # ... and this shard's edits must outscore, by γ, every other shard on their own tokens.
    rivals = None
    if hparams.negatives and shards > (0 if new_shard else 1):
        shard_scores = shard_changes(edit_inputs, after["deltas"].to(device)).norm(dim=-1)
        if not new_shard:
            shard_scores[shard] = -math.inf
        rivals = shard_scores.max(0).values

    trained = torch.zeros(shape, device=device, requires_grad=True)
    limit = hparams.norm_constraint

    def side() -> torch.Tensor:
        return torch.clamp(base + mask * trained, -limit, limit)

    def scores() -> tuple[torch.Tensor, torch.Tensor]:
        """Δ_act at the edits' positions, and the largest at each irrelevant text's tokens."""
        flat = (every_input @ side()).norm(dim=-1)
        return flat[: sizes[0]], segment_maxima(flat[sizes[0] :], sizes[1:])

    def margins() -> torch.Tensor:
        edit, others = scores()
        loss = margin_loss(edit, others, hparams.act_margin)
        if rivals is not None:
            loss = loss + torch.relu(hparams.act_margin[2] + rivals - edit).mean()
        return loss

    def routed_apart() -> bool:
        """The edits' positions pass the threshold they would set and outscore the other
        shards there; no irrelevant token passes (scored with the side memory as it is now,
        which may be before any step)."""
        with torch.no_grad():
            edit, others = scores()
        if rivals is not None and not bool((edit > rivals).all()):
            return False
        return hparams.act_ratio * float(edit.min()) > float(others.max())

    def through_side(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        change = inputs.to(device, torch.float32) @ side()
        return output + change.to(output.dtype)

    result = train_at_module(
        lm,
        request,
        [trained],
        hparams,
        path,
        through_side,
        memory,
        extra_loss=margins,
        until=routed_apart,
        optimizer="sgd",
        replayed=replayed,
    )
    with torch.no_grad():
        delta = side().detach()
        edit_scores, other_scores = scores()
    score = float(edit_scores.min())
    info: dict[str, Any] = {
        "shard": shard,
        "replayed": len(replayed),
        "near_misses": len(near),
        "steps": result.steps,
        "final_nll": result.nll,
        "edit_score": score,
        "margin_loss": float(margin_loss(edit_scores, other_scores, hparams.act_margin)),
        "irrelevant_score": float(other_scores.max()),
    }
    # ε covers every edit of the shard: the replayed ones are scored anew, others as they were.
    earlier = math.inf if new_shard or replayed else float(after["thresholds"][shard])
    if new_shard:
        after["deltas"] = torch.cat([after["deltas"], torch.zeros((1, *shape))])
        after["thresholds"] = torch.cat([after["thresholds"], torch.zeros(1)])
        after["counts"] = torch.cat([after["counts"], torch.zeros(1, dtype=torch.long)])
    after["deltas"][shard] = delta.cpu()
    after["thresholds"][shard] = min(earlier, hparams.act_ratio * score)
    after["counts"][shard] += 1
    prompt, target = len(row[0]) - len(row[2]) + 1, len(row[2])
    after["tokens"] = torch.cat([after["tokens"], torch.tensor(row[0] + row[2][-1:])])
    after["edits"] = torch.cat([after["edits"], torch.tensor([[shard, prompt, target]])])
    if request.subject not in subjects:
        name = torch.tensor(list(request.subject.encode()), dtype=torch.uint8)
        after["subject_bytes"] = torch.cat([after["subject_bytes"], name])
        after["subject_sizes"] = torch.cat([after["subject_sizes"], torch.tensor([len(name)])])
    if hparams.merge_every and len(after["edits"]) % hparams.merge_every == 0:
        info["merged_shards"] = merge_shards(after, hparams.merge_density)
    return [MemoryDelta.to_reach(path, SideMemory.kind, {}, memory, after)], info


def merge_shards(shards: dict[str, torch.Tensor], density: float) -> int:
    """Merge the live shards (those holding edits) into the first of them with TIES, in place:
    it gets the merged delta, the smallest threshold and all their edits; the others are retired
    (zero delta, no edits: a score of 0 never passes). Returns how many shards were merged."""
    live = torch.nonzero(shards["counts"] > 0).flatten()
    if len(live) > 1:
        first, rest = live[0], live[1:]
        shards["deltas"][first] = ties_merge(shards["deltas"][live], density)
        shards["thresholds"][first] = shards["thresholds"][live].min()
        shards["counts"][first] = shards["counts"][live].sum()
        shards["deltas"][rest] = 0.0
        shards["thresholds"][rest] = 0.0
        shards["counts"][rest] = 0
        owners = shards["edits"][:, 0]
        owners[torch.isin(owners, rest)] = first
    return len(live)


@register("wise", WISEHyperParams, "A routed side memory beside one value matrix (WISE)")
def wise(lm: LM, requests: list[EditRequest], hparams: WISEHyperParams) -> MethodResult:
    return edit_one_by_one(lm, requests, hparams, edit_one)
