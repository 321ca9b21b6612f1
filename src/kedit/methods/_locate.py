"""What the locate-then-edit family shares: context prefixes, keys, and the value optimisation.

Notation follows ROME (Meng et al., 2022): a key k is the input of an MLP output projection
W at the edited token (`fact_token`: the subject's last token, as in ROME, or the prompt's
last); a value v is that projection's output there.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kedit.hooks import capture, hooks, replace_output, start_at_block, stop_after
from kedit.lm import LM
from kedit.methods._memory import backward_tokens, token_chunks
from kedit.methods.registry import HyperParams, hp
from kedit.requests import EditRequest
from kedit.stats import note_use, second_moment, statistics_record

DECAY_FORMS = ("squared", "easyedit")
STOP_RULES = ("nll", "most_probable")
EASYEDIT_CORPUS = "wikipedia"
logger = logging.getLogger("kedit")
FACT_TOKENS = ("subject_last", "last")


def delta_decay(delta: torch.Tensor, start: torch.Tensor, form: str) -> torch.Tensor:
    """The decay term of each row's value delta, relative to the unedited output `start`:
    (‖δ‖/‖v₀‖)² for 'squared', ‖δ‖/‖v₀‖² for 'easyedit' (as ROME's and EasyEdit's code)."""
    norm, start_norm2 = delta.norm(dim=1), start.norm(dim=1) ** 2
    return norm**2 / start_norm2 if form == "squared" else norm / start_norm2


@dataclass
class LocateHyperParams(HyperParams):
    """What ROME, MEMIT and their relatives share: the value optimisation, the statistics and
    the context prefixes."""

    layers: list[int] = hp([5], "Layers whose MLP output projection is edited.")
    v_steps: int = hp(25, "Maximum gradient steps of the value optimisation.")
    v_lr: float = hp(0.5, "Adam learning rate of the value optimisation.")
    v_first_step: float = hp(
        0.0,
        "Length of a first step against the gradient's sign, as a multiple of the unedited"
        " output's norm, before Adam takes over (0: none, Adam from zero as in ROME).",
    )
    v_weight_decay: float = hp(0.5, "Weight of the decay term on each value delta.")
    v_weight_decay_form: str = hp(
        "squared",
        "The decay term: 'squared' = (‖δ‖/‖v₀‖)², free of the output's scale; 'easyedit' ="
        " ‖δ‖/‖v₀‖², the term of ROME's, MEMIT's and EasyEdit's code (the same weight does"
        " not mean the same there).",
    )
    kl_factor: float = hp(0.0625, "Weight of the KL term that keeps '{subject} is a' unchanged.")
    clamp_norm_factor: float = hp(4.0, "Clamp ‖δ‖ to this multiple of the unedited output's norm.")
    v_stop: str = hp(
        "nll",
        "When a request's value optimisation stops: 'nll' once every prompt's mean target NLL is"
        " below v_stop_nll; 'most_probable' once every target token is the most probable next"
        " token after every prompt (MPES, Gupta et al. 2025: shorter values, less norm growth"
        " under sequential editing, fewer steps).",
    )
    v_stop_nll: float = hp(
        0.05,
        "Stop once every prompt's mean target NLL is below this (for a request with k targets,"
        " a Multi-Label Edit: below this + log k, each target near an equal share).",
    )
    v_patience: int = hp(
        0,
        "Also stop a request once its worst prompt's target NLL has not reached a new low for"
        " this many steps (0: never). Requests that the decay and KL terms hold above the stop"
        " rule then end where they level off instead of running all v_steps.",
    )
    mom2_corpus: str | None = hp(
        None,
        "Corpus of the second moment: None for the model's default (tinyworld for the bundled"
        " models, Wikitext-103 for others), 'tinyworld', a .txt/.jsonl/.parquet file or folder,"
        " a dataset saved with save_to_disk, or a hub dataset NAME[:CONFIG].",
    )
    mom2_n_samples: int = hp(100000, "Maximum number of corpus documents for the second moment.")
    mom2_max_length: int = hp(256, "Token cap per document for the second moment.")
    mom2_dtype: str = hp("float64", "Accumulation dtype of the second moment.")
    prefix_lengths: list[list[int]] = hp(
        [[5, 10], [10, 10]], "Context prefixes as [length in tokens, count] pairs."
    )
    prefix_seed_words: list[str] = hp(
        ["The", "Therefore", "Because", "I", "You"], "Words the context prefixes start from."
    )
    prefix_seed: int = hp(0, "Random seed of the context prefixes.")
    fact_token: str = hp(
        "subject_last",
        "Token whose key and value are edited: 'subject_last' (the subject's last token) or "
        "'last' (the prompt's last token, where models that read the subject from the "
        "prediction position hold the fact).",
    )
    v_batch_tokens: int | None = hp(
        None,
        "Token budget of one value-optimisation batch (requests are optimised together); None:"
        " what fits the device, at most 4096 (kedit.methods._memory).",
    )

    MULTI_LABEL = True
    ALIASES = {
        "v_num_grad_steps": "v_steps",
        "mom2_dataset": "mom2_corpus",
        "context_template_length_params": "prefix_lengths",
    }
    IGNORED = HyperParams.IGNORED | {"v_loss_layer"}

    @classmethod
    def from_dict(cls, values: dict[str, Any], method: str = "") -> HyperParams:
        """As `HyperParams.from_dict`; EasyEdit's and ROME's corpus name 'wikipedia' (Wikipedia
        20200501.en through a `datasets` loading script that no longer runs) is read as the
        model's default corpus, with a notice."""
        for key in ("mom2_dataset", "mom2_corpus"):
            if values.get(key) == EASYEDIT_CORPUS:
                logger.warning(
                    "kedit: %s %r (EasyEdit's Wikipedia 20200501.en, which `datasets` no longer "
                    "loads) is read as the model's default corpus (Wikitext-103 for a model "
                    "that is not bundled); import the exact statistics with `kedit stats import`",
                    key,
                    EASYEDIT_CORPUS,
                )
                values = {**values, key: None}
        return super().from_dict(values, method)

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: expected at least one layer, got []")
        if self.v_weight_decay_form not in DECAY_FORMS:
            raise ValueError(
                f"v_weight_decay_form: expected one of {', '.join(DECAY_FORMS)}, "
                f"got {self.v_weight_decay_form!r}"
            )
        if self.v_stop not in STOP_RULES:
            raise ValueError(
                f"v_stop: expected one of {', '.join(STOP_RULES)}, got {self.v_stop!r}"
            )
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(
                f"fact_token: expected one of {', '.join(FACT_TOKENS)}, got {self.fact_token!r}"
            )
        if self.v_patience < 0:
            raise ValueError(f"v_patience: expected an integer >= 0, got {self.v_patience!r}")
        for name in ("v_steps", "mom2_n_samples", "mom2_max_length", "v_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not self.v_first_step >= 0:
            raise ValueError(f"v_first_step: expected a number >= 0, got {self.v_first_step!r}")
        for name in ("v_lr", "clamp_norm_factor"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")

    def stats_key(self) -> tuple:
        return tuple(self.stats_settings().values())

    def stats_settings(self) -> dict[str, Any]:
        """The statistics these hyper-parameters ask for, as `kedit.stats` takes them."""
        return {
            "corpus": self.mom2_corpus,
            "n_samples": self.mom2_n_samples,
            "max_length": self.mom2_max_length,
            "dtype": self.mom2_dtype,
        }


def layer_second_moment(lm: LM, hparams: LocateHyperParams, layer: int) -> torch.Tensor:
    """C = E[k kᵀ] of a layer's keys in float64 on the layer's device, kept on `lm.cache` after
    the first use."""
    key = ("mom2", layer, hparams.stats_key())
    if key not in lm.cache:
        moment = second_moment(lm, layer, **hparams.stats_settings())
        lm.cache[key] = moment.to(lm.device_of(lm.layout.mlp_out_name(layer)), torch.float64)
    note_statistics(lm, hparams, layer)
    return lm.cache[key]


def inverse_second_moment(lm: LM, hparams: LocateHyperParams, layer: int) -> torch.Tensor:
    """C⁻¹ for a layer, computed once per model and statistics and kept on `lm.cache`."""
    key = ("inverse_mom2", layer, hparams.stats_key())
    if key not in lm.cache:
        # linalg.inv returns a column-major result; products with it are then up to 30x slower.
        lm.cache[key] = torch.linalg.inv(layer_second_moment(lm, hparams, layer)).contiguous()
    note_statistics(lm, hparams, layer)
    return lm.cache[key]


def second_moment_cholesky(lm: LM, hparams: LocateHyperParams, layer: int) -> torch.Tensor | None:
    """The lower Cholesky factor of a layer's C, computed once per model and statistics and
    kept on `lm.cache` (half the work of one direct solve); None where C is singular."""
    key = ("cholesky_mom2", layer, hparams.stats_key())
    if key not in lm.cache:
        factor, info = torch.linalg.cholesky_ex(layer_second_moment(lm, hparams, layer))
        lm.cache[key] = factor if int(info) == 0 else None
    note_statistics(lm, hparams, layer)
    return lm.cache[key]


def note_statistics(lm: LM, hparams: LocateHyperParams, layer: int) -> None:
    """Note that the edit being computed uses this layer's statistics (`kedit.stats.note_use`),
    from a record kept on `lm.cache`. Every helper that hands out C or work derived from it
    calls this, cached or not, so each edit's `info["statistics"]` names what it used."""
    key = ("mom2_record", layer, hparams.stats_key())
    if key not in lm.cache:
        lm.cache[key] = statistics_record(lm, layer, **hparams.stats_settings())
    note_use(lm.cache[key])


def context_prefixes(lm: LM, hparams: LocateHyperParams) -> list[str]:
    """Short texts sampled from the model, put before a prompt when computing keys and values.

    ROME averages over such prefixes so that the edit holds after any preceding text. The
    first prefix is empty. Sampled once per model and cached on `lm.cache`.
    """
    lengths, seed_words = hparams.prefix_lengths, hparams.prefix_seed_words
    key = ("context_prefixes", tuple(map(tuple, lengths)), tuple(seed_words), hparams.prefix_seed)
    if key in lm.cache:
        return lm.cache[key]
    prefixes = [""]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(hparams.prefix_seed)
        for length, count in lengths:
            for index in range(count):
                word = seed_words[index % len(seed_words)]
                ids = torch.tensor([lm.encode_prompt(word)], device=lm.device)
                out = lm.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    top_k=5,
                    max_new_tokens=length,
                    pad_token_id=lm.tokenizer.pad_token_id,
                )
                text = lm.tokenizer.decode(out[0], skip_special_tokens=True)
                text = text.replace("{", " ").replace("}", " ").strip()
                prefixes.append(f"{text}. ")
    lm.cache[key] = prefixes
    return prefixes


def lookup_index(
    lm: LM, prefix: str, text: str, subject: str, fact_token: str = "subject_last"
) -> int:
    """Token index in `prefix + text` of the edited token (`fact_token`): the subject's last
    token, or the prompt's last one (the subject is in `text`)."""
    start = text.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {text!r}")
    end = len(text) if fact_token == "last" else start + len(subject)
    return len(lm.encode_prompt(prefix + text[:end])) - 1


@torch.no_grad()
def keys_at_lookup(
    lm: LM, layer: int, prefixes: list[str], request: EditRequest, fact_token: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (inputs of the MLP output projection) at the edited token (`lookup_index`).

    Returns `(keys, outputs)`: one row per prefix, the key and the projection's output.
    """
    texts = [prefix + request.text for prefix in prefixes]
    positions = torch.tensor(
        [lookup_index(lm, prefix, request.text, request.subject, fact_token) for prefix in prefixes]
    )
    ids, mask = lm.pad([lm.encode_prompt(text) for text in texts])
    name = lm.layout.mlp_out_name(layer)
    with capture(lm.model, [name], "input") as keys, capture(lm.model, [name]) as outs:
        with stop_after(lm.model, name):
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    device = keys[name].device
    rows, positions = torch.arange(len(texts), device=device), positions.to(device)
    return keys[name][rows, positions].float(), outs[name][rows, positions].float()


@dataclass
class ValueResult:
    """The delta added to one site's output that makes the target likely, and how the
    optimisation went."""

    delta: torch.Tensor
    initial_output: torch.Tensor
    steps: int
    target_nll: float


def optimize_value(
    lm: LM,
    request: EditRequest,
    layer: int,
    prefixes: list[str],
    hparams: LocateHyperParams,
    site: str,
    essence_prompt: str = "{} is a",
) -> ValueResult:
    """`optimize_values` for one request and the one site `site` (ROME Eq. 4)."""
    return optimize_values(lm, [request], layer, prefixes, hparams, [site], essence_prompt)[0][0]


def optimize_values(
    lm: LM,
    requests: list[EditRequest],
    layer: int,
    prefixes: list[str],
    hparams: LocateHyperParams,
    sites: list[str],
    essence_prompt: str = "{} is a",
) -> list[list[ValueResult]]:
    """For each request, vectors delta_s that, added to the outputs of the modules `sites` (all
    in block `layer`) at the edited token, make `target_new` likely after every prefix
    (ROME Eq. 4; several sites at once as in PMET). One list per request, one result per site.
    A request with `extra_targets` (Multi-Label Edit) makes all its targets likely: its target
    NLL is the mean over targets and prefixes.

    Loss per request = mean NLL of the target tokens + kl_factor * KL(new || old) of the
    next-token distribution at the edited token of `essence_prompt` (keeps what the subject
    "is") +
    for each site, v_weight_decay times `delta_decay` of its delta. Each delta is clamped
    to clamp_norm_factor times its site's unedited output norm. A request stops once each of
    its prompts' mean target NLL is below `v_stop_nll` (`v_stop` 'nll') or once each target
    token is the most probable one after each prompt ('most_probable'), or, with `v_patience`,
    once its worst prompt's NLL has not reached a new low for that many steps.

    The requests are optimised together, each with its own deltas (the losses are summed, so
    the gradients do not mix), in chunks of about `v_batch_tokens` tokens (None: what fits the
    device, `kedit.methods._memory`). Nothing before the edited token depends on a delta: those
    positions run once and are fed to every step as cached keys and values, and so do the
    blocks below `layer` for the others.
    """
    budget = hparams.v_batch_tokens or backward_tokens(lm, layer)
    tokens = [
        (len(prefixes) * len(request.targets) + 1)
        * len(lm.encode_prompt(prefixes[-1] + request.text))
        for request in requests
    ]
    results: list[list[ValueResult]] = []
    for chunk in token_chunks(requests, tokens, budget):
        results.extend(_optimize_chunk(lm, chunk, layer, prefixes, hparams, sites, essence_prompt))
    return results


@dataclass
class _ValueBatch:
    """The rows of a value optimisation: for each request, one row per prefix and target (prompt
    and all target tokens but the last) and its essence row. Each row is split at the edited token
    into a context (left-padded, run once) and a suffix (right-padded, run every step)."""

    owner: torch.Tensor  # request index of each row
    is_rewrite: torch.Tensor  # True for prompt rows, False for essence rows
    target_row: torch.Tensor  # for each prompt row, its row of the target tensors
    at: torch.Tensor  # position of the edited token in the suffix
    context_ids: torch.Tensor
    context_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    suffix_positions: torch.Tensor
    target_ids: torch.Tensor  # (rewrite rows, longest target), padded
    target_mask: torch.Tensor
    target_positions: torch.Tensor  # suffix positions that predict each target token
    nll_floor: torch.Tensor  # per request, log of its number of targets: the NLL of equal shares

    @classmethod
    def build(
        cls,
        lm: LM,
        requests: list[EditRequest],
        prefixes: list[str],
        essence_prompt: str,
        fact_token: str,
    ) -> _ValueBatch:
        rows: list[list[int]] = []
        lookups, owners, targets = [], [], []
        for index, request in enumerate(requests):
            for target in request.targets:
                target_ids = lm.encode(target)
                for prefix in prefixes:
                    prompt_ids = lm.encode_prompt(prefix + request.text)
                    rows.append(prompt_ids + target_ids[:-1])
                    lookups.append(
                        lookup_index(lm, prefix, request.text, request.subject, fact_token)
                    )
                    owners.append(index)
                    targets.append((len(prompt_ids) - 1, target_ids))
            essence = essence_prompt.replace("{}", request.subject)
            rows.append(lm.encode_prompt(essence))
            lookups.append(lookup_index(lm, "", essence, request.subject, fact_token))
            owners.append(index)
            targets.append(None)
        # A row whose subject ends at its first token has no context; then none is cached.
        cuts = lookups if min(lookups) > 0 else [0] * len(rows)
        pad = lm.tokenizer.pad_token_id
        context_len = max(cuts)
        suffix_len = max(len(row) - cut for row, cut in zip(rows, cuts, strict=True))
        longest = max(len(t[1]) for t in targets if t is not None)
        n_rewrite = sum(t is not None for t in targets)
        context_ids = torch.full((len(rows), context_len), pad, dtype=torch.long)
        context_mask = torch.zeros((len(rows), context_len), dtype=torch.long)
        suffix_ids = torch.full((len(rows), suffix_len), pad, dtype=torch.long)
        suffix_mask = torch.zeros((len(rows), suffix_len), dtype=torch.long)
        target_ids = torch.zeros((n_rewrite, longest), dtype=torch.long)
        target_mask = torch.zeros((n_rewrite, longest))
        target_positions = torch.zeros((n_rewrite, longest), dtype=torch.long)
        rewrite = 0
        for index, (row, cut) in enumerate(zip(rows, cuts, strict=True)):
            if cut:
                context_ids[index, context_len - cut :] = torch.tensor(row[:cut])
                context_mask[index, context_len - cut :] = 1
            suffix_ids[index, : len(row) - cut] = torch.tensor(row[cut:])
            suffix_mask[index, : len(row) - cut] = 1
            if targets[index] is not None:
                first, ids = targets[index]
                target_ids[rewrite, : len(ids)] = torch.tensor(ids)
                target_mask[rewrite, : len(ids)] = 1
                target_positions[rewrite] = (first - cut + torch.arange(longest)).clamp(
                    max=suffix_len - 1
                )
                rewrite += 1
        cut_t = torch.tensor(cuts)
        device = lm.device
        is_rewrite = torch.tensor([t is not None for t in targets], device=device)
        return cls(
            owner=torch.tensor(owners, device=device),
            is_rewrite=is_rewrite,
            target_row=is_rewrite.long().cumsum(0) - 1,
            at=(torch.tensor(lookups) - cut_t).to(device),
            context_ids=context_ids.to(device),
            context_mask=context_mask.to(device),
            suffix_ids=suffix_ids.to(device),
            suffix_mask=suffix_mask.to(device),
            suffix_positions=(cut_t[:, None] + torch.arange(suffix_len)).to(device),
            target_ids=target_ids.to(device),
            target_mask=target_mask.to(device),
            target_positions=target_positions.to(device),
            nll_floor=torch.tensor([math.log(len(r.targets)) for r in requests], device=device),
        )

    def target_nll(
        self, logits: torch.Tensor, rows: torch.Tensor, n_requests: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per request, the mean over its prompt rows (of `rows`, whose `logits` these are) of
        each row's mean target-token NLL, the largest row NLL (detached), and whether every
        target token is the most probable one in every row."""
        rewrite = self.is_rewrite[rows]
        targets = self.target_row[rows[rewrite]]
        picked = logits[rewrite][
            torch.arange(len(targets), device=logits.device)[:, None],
            self.target_positions[targets],
        ]
        token_logp = (
            torch.log_softmax(picked.float(), dim=-1)
            .gather(2, self.target_ids[targets][..., None])
            .squeeze(-1)
        )
        weights = self.target_mask[targets]
        nll_rows = -(token_logp * weights).sum(1) / weights.sum(1)
        owners = self.owner[rows][rewrite]
        zeros = torch.zeros(n_requests, device=logits.device)
        count = zeros.index_add(0, owners, torch.ones_like(nll_rows))
        nll_mean = zeros.index_add(0, owners, nll_rows) / count.clamp(min=1)
        nll_max = torch.full_like(zeros, float("-inf")).scatter_reduce(
            0, owners, nll_rows.detach(), "amax"
        )
        missed = (picked.detach().argmax(-1) != self.target_ids[targets]) & (weights > 0)
        misses = zeros.index_add(0, owners, missed.any(1).float())
        return nll_mean, nll_max, misses == 0

    def essence_logp(
        self, logits: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token log-probabilities at the edited token of each essence row among `rows`, and
        the request each belongs to."""
        essence = ~self.is_rewrite[rows]
        at_lookup = logits[essence][
            torch.arange(int(essence.sum()), device=logits.device), self.at[rows[essence]]
        ]
        return torch.log_softmax(at_lookup.float(), dim=-1), self.owner[rows][essence]


def _cache_argument(model: Any) -> str:
    """The name under which this transformers version takes a KV cache (`cache` from 5.2x,
    `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_tensors(output: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer `(keys, values)` of the KV cache a forward pass returned (the layered cache of
    recent transformers versions and the older lists of tensors)."""
    cache = output.cache if "cache" in output else output.past_key_values
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _optimize_chunk(
    lm: LM,
    requests: list[EditRequest],
    layer: int,
    prefixes: list[str],
    hparams: LocateHyperParams,
    sites: list[str],
    essence_prompt: str,
) -> list[list[ValueResult]]:
    """`optimize_values` for requests that fit in one batch."""
    batch = _ValueBatch.build(lm, requests, prefixes, essence_prompt, hparams.fact_token)
    return _ValueSearch(lm, batch, len(requests), layer, sites, hparams).run()


class _ValueSearch:
    """The value optimisation of one batch of requests (ROME Eq. 4), in the order it runs.

    Once: `_run_context` runs the positions before each row's edited token (no delta reaches
    them through causal attention) and keeps their keys and values; `_run_below` runs the blocks
    below the edited layer (no delta reaches them either) and keeps their output, the edited
    block's input, and v₀, each site's unedited output at the edited token.
    Then each step: `_forward` runs the unfinished requests' rows from the edited block on with
    the deltas added at the sites (`_editing`), `_stop` ends the requests that meet the stopping
    rule, `_loss` sums ROME Eq. 4's terms over the others, `_descend` takes one step (a first
    step along the gradient's sign, then Adam) and `_clamp` bounds each delta's norm.
    """

    def __init__(
        self,
        lm: LM,
        batch: _ValueBatch,
        n_requests: int,
        layer: int,
        sites: list[str],
        hparams: LocateHyperParams,
    ) -> None:
        self.lm, self.batch, self.n_requests = lm, batch, n_requests
        self.layer, self.sites, self.hparams = layer, sites, hparams
        device = lm.device
        self.all_rows = torch.arange(len(batch.owner), device=device)
        self.rows = self.all_rows  # the rows of the current forward pass, read by the hooks
        self.context = self._run_context()
        self.hidden, self.initial = self._run_below()
        self.deltas = [torch.zeros_like(start, requires_grad=True) for start in self.initial]
        self.optimizer = torch.optim.Adam(self.deltas, lr=hparams.v_lr)
        self.max_norms = [hparams.clamp_norm_factor * start.norm(dim=1) for start in self.initial]
        self.reference: torch.Tensor | None = None  # the unedited essence distributions
        self.active = torch.ones(n_requests, dtype=torch.bool, device=device)
        self.lowest = torch.full((n_requests,), float("inf"), device=device)
        self.stale = torch.zeros(n_requests, dtype=torch.long, device=device)
        self.done: list[tuple[int, float] | None] = [None] * n_requests

    def run(self) -> list[list[ValueResult]]:
        """Optimise until every request has stopped; one `ValueResult` per request and site."""
        batch = self.batch
        with self._editing():
            for step in range(self.hparams.v_steps + 1):
                self.rows = self.all_rows[self.active[batch.owner]]
                logits = self._forward(self.rows)
                nll_mean, nll_max, most_probable = batch.target_nll(
                    logits, self.rows, self.n_requests
                )
                essence_logp, essence_owners = batch.essence_logp(logits, self.rows)
                if self.reference is None:  # step 0 runs with zero deltas: the unedited model
                    self.reference = torch.zeros(
                        self.n_requests, essence_logp.shape[1], device=essence_logp.device
                    )
                    self.reference[essence_owners] = essence_logp.detach()
                if self._stop(step, nll_mean, nll_max, most_probable):
                    break
                self._descend(self._loss(nll_mean, essence_logp, essence_owners), step)
                self._clamp()
        return [
            [
                ValueResult(delta[r].detach(), start[r], self.done[r][0], self.done[r][1])
                for delta, start in zip(self.deltas, self.initial, strict=True)
            ]
            for r in range(self.n_requests)
        ]

    def _run_context(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, the keys and values of the positions before each row's edited token
        (None where no row has any)."""
        batch = self.batch
        if not batch.context_ids.shape[1]:
            return None
        with torch.no_grad():
            # Only the KV cache is needed: the base model skips the unembedding.
            out = self.lm.model.base_model(
                input_ids=batch.context_ids,
                attention_mask=batch.context_mask,
                position_ids=(batch.context_mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True,
            )
        return _cache_tensors(out)

    def _run_below(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The edited block's input for every row, and each site's unedited output v₀ at the
        edited token of each request's first (bare) prompt (n_requests × width, float32)."""
        block, batch = self.lm.layout.block(self.layer), self.batch
        model = self.lm.model
        with torch.no_grad(), capture(model, [block], "input") as seen:
            with capture(model, self.sites) as out, stop_after(model, block):
                self._forward(self.all_rows)
        first_rows = torch.tensor(
            [int((batch.owner == r).nonzero()[0]) for r in range(self.n_requests)],
            device=batch.owner.device,
        )
        initial = []
        for site in self.sites:
            output = out[site]
            rows = first_rows.to(output.device)
            initial.append(output[rows, batch.at[first_rows].to(output.device)].float())
        return seen[block], initial

    def _forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits of the suffixes of `rows`, after the cached context."""
        from transformers import DynamicCache

        batch, cache = self.batch, None
        mask = batch.suffix_mask[rows]
        if self.context is not None:
            cache = DynamicCache(
                ddp_cache_data=[
                    (keys[rows.to(keys.device)], values[rows.to(values.device)])
                    for keys, values in self.context
                ]
            )
            mask = torch.cat([batch.context_mask[rows], mask], dim=1)
        model = self.lm.model
        return model(
            input_ids=batch.suffix_ids[rows],
            attention_mask=mask,
            position_ids=batch.suffix_positions[rows],
            use_cache=cache is not None,
            **{_cache_argument(model): cache},
        ).logits

    @contextmanager
    def _editing(self) -> Iterator[None]:
        """Inside: forward passes start at the edited block from `hidden` (the blocks below are
        left out), each site's output gets its request's delta at the edited token, and the
        model's parameters take no gradient."""
        model, layout = self.lm.model, self.lm.layout
        needs_grad = [p for p in model.parameters() if p.requires_grad]
        for p in needs_grad:
            p.requires_grad_(False)
        # Site hooks go in before the blocks below `layer` are cut out, which renumbers the
        # blocks: a module path resolved afterwards would name a deeper block.
        site_hooks = [
            replace_output(model, site, self._add_delta(delta))
            for site, delta in zip(self.sites, self.deltas, strict=True)
        ]
        hidden = self.hidden
        starting = start_at_block(
            model, layout.blocks, self.layer, lambda: hidden[self.rows.to(hidden.device)]
        )
        try:
            with hooks(*site_hooks, starting):
                yield
        finally:
            for p in needs_grad:
                p.requires_grad_(True)

    def _add_delta(self, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A site hook: adds each row's request's `delta` at the row's edited token."""
        batch = self.batch

        def add_delta(output: torch.Tensor) -> torch.Tensor:
            rows = self.rows
            device = output.device
            where = (torch.arange(len(rows), device=device), batch.at[rows].to(device))
            output = output.clone()
            owners = batch.owner[rows].to(delta.device)
            output[where] = output[where] + delta[owners].to(device, output.dtype)
            return output

        return add_delta

    def _stop(
        self,
        step: int,
        nll_mean: torch.Tensor,
        nll_max: torch.Tensor,
        most_probable: torch.Tensor,
    ) -> bool:
        """End the requests that meet the stopping rule (`v_stop`, `v_patience`), or all at the
        last step, recording their step and mean NLL; whether every request has ended."""
        hparams = self.hparams
        # Decided on the device, read back once: one sync per step, not per request.
        if hparams.v_stop == "most_probable":
            reached = most_probable
        else:
            reached = nll_max < hparams.v_stop_nll + self.batch.nll_floor.to(nll_max.device)
        if hparams.v_patience:
            lower = nll_max < self.lowest
            self.lowest = torch.where(lower, nll_max, self.lowest)
            self.stale = torch.where(lower, 0, self.stale + 1)
            reached = reached | (self.stale >= hparams.v_patience)
        finished = self.active.clone() if step == hparams.v_steps else self.active & reached
        index = finished.nonzero().flatten()
        for r, nll in zip(index.tolist(), nll_mean.detach()[index].tolist(), strict=True):
            self.done[r] = (step, nll)
        self.active &= ~finished
        return not self.active.any()

    def _loss(
        self, nll_mean: torch.Tensor, essence_logp: torch.Tensor, essence_owners: torch.Tensor
    ) -> torch.Tensor:
        """ROME Eq. 4 summed over the active requests (their gradients do not mix): mean target
        NLL + kl_factor · KL(new ‖ old) on the essence prompt + v_weight_decay · decay."""
        hparams, active = self.hparams, self.active
        kl_rows = (essence_logp.exp() * (essence_logp - self.reference[essence_owners])).sum(1)
        kl = (kl_rows * active[essence_owners]).sum()
        decay = sum(
            delta_decay(delta, start, hparams.v_weight_decay_form)[active.to(delta.device)].sum()
            for delta, start in zip(self.deltas, self.initial, strict=True)
        )
        nll = (nll_mean * active).sum()
        return nll + hparams.kl_factor * kl + hparams.v_weight_decay * decay.to(nll.device)

    def _descend(self, loss: torch.Tensor, step: int) -> None:
        """One step on the deltas: along the gradient's sign at step 0 with `v_first_step`,
        else Adam's. Finished requests' deltas stay where they are (Adam's momentum would still
        move them)."""
        finished = [~self.active.to(delta.device) for delta in self.deltas]
        kept = [d.detach()[f].clone() for d, f in zip(self.deltas, finished, strict=True)]
        self.optimizer.zero_grad()
        loss.backward()
        if step == 0 and self.hparams.v_first_step > 0:
            _first_step(self.deltas, self.initial, self.hparams.v_first_step)
        else:
            self.optimizer.step()
        with torch.no_grad():
            for delta, rows, value in zip(self.deltas, finished, kept, strict=True):
                delta[rows] = value

    @torch.no_grad()
    def _clamp(self) -> None:
        """Scale each delta down to at most clamp_norm_factor times its site's ‖v₀‖."""
        for delta, max_norm in zip(self.deltas, self.max_norms, strict=True):
            scale = (max_norm / delta.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])


@torch.no_grad()
def _first_step(deltas: list[torch.Tensor], initial: list[torch.Tensor], length: float) -> None:
    """Move each delta from zero against the sign of its gradient (Adam's first direction) by
    `length` times its site's unedited output norm.

    Adam's first step has length v_lr·√d whatever the output's scale, while the deltas that
    make a target likely are about as long as the output itself; from zero the target NLL can
    sit on a plateau for tens of steps while the decay term pulls the delta back. Requests
    without a gradient (finished at step 0) stay at zero.
    """
    for delta, start in zip(deltas, initial, strict=True):
        direction = delta.grad.sign() / delta.shape[1] ** 0.5
        delta.sub_(length * start.norm(dim=1, keepdim=True) * direction)


def mlp_out_param(lm: LM, layer: int) -> str:
    return f"{lm.layout.mlp_out_name(layer)}.weight"


def as_param_factors(
    lm: LM, left: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of an (out, in) update `left @ right` in the parameter's storage orientation.

    Vectors are taken as a rank-one update `left ⊗ right`.
    """
    left = left[:, None] if left.dim() == 1 else left
    right = right[None, :] if right.dim() == 1 else right
    if lm.layout.conv1d:
        return right.T, left.T
    return left, right
