"""What the locate-then-edit family shares: context prefixes, keys, and the value optimisation.

Notation follows ROME (Meng et al., 2022): a key k is the input of an MLP output projection
W at the edited token (`fact_token`: the subject's last token, as in ROME, or the prompt's
last); a value v is that projection's output there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from kedit.edits import WeightDelta, weights_version
from kedit.hooks import capture, hooks, replace_output, start_at_block, stop_after
from kedit.lm import LM
from kedit.methods._above import Above, adds_to_block_output, read_logits
from kedit.methods._memory import backward_tokens, token_chunks
from kedit.methods._train import frozen
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
class StatisticsHyperParams(HyperParams):
    """The second-moment statistics C = E[k kᵀ] of the MLP output projections' keys that a
    method reads (`layer_second_moment`): corpus, sample count, length cap, dtype."""

    mom2_corpus: str | None = hp(
        None,
        "Corpus of the second moment: None for the model's default (tinyworld for the bundled"
        " models, Wikitext-103 for others), 'tinyworld', a .txt/.jsonl/.parquet file or folder,"
        " a dataset saved with save_to_disk, or a hub dataset NAME[:CONFIG].",
    )
    mom2_n_samples: int = hp(100000, "Maximum number of corpus documents for the second moment.")
    mom2_max_length: int = hp(256, "Token cap per document for the second moment.")
    mom2_dtype: str = hp("float64", "Accumulation dtype of the second moment.")

    ALIASES = {"mom2_dataset": "mom2_corpus"}

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
        for name in ("mom2_n_samples", "mom2_max_length"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")

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


@dataclass
class LocateHyperParams(StatisticsHyperParams):
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
        **StatisticsHyperParams.ALIASES,
        "v_num_grad_steps": "v_steps",
        "context_template_length_params": "prefix_lengths",
    }
    IGNORED = HyperParams.IGNORED | {"v_loss_layer"}

    def validate(self) -> None:
        super().validate()
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
        for name in ("v_steps", "v_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not self.v_first_step >= 0:
            raise ValueError(f"v_first_step: expected a number >= 0, got {self.v_first_step!r}")
        for name in ("v_lr", "clamp_norm_factor"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")


def layer_second_moment(lm: LM, hparams: StatisticsHyperParams, layer: int) -> torch.Tensor:
    """C = E[k kᵀ] of a layer's keys in float64 on the layer's device, kept on `lm.cache` after
    the first use."""
    key = ("mom2", layer, hparams.stats_key())
    if key not in lm.cache:
        moment = second_moment(lm, layer, **hparams.stats_settings())
        lm.cache[key] = moment.to(lm.device_of(lm.layout.mlp_out_name(layer)), torch.float64)
    note_statistics(lm, hparams, layer)
    return lm.cache[key]


def inverse_second_moment(lm: LM, hparams: StatisticsHyperParams, layer: int) -> torch.Tensor:
    """C⁻¹ for a layer, computed once per model and statistics and kept on `lm.cache`."""
    key = ("inverse_mom2", layer, hparams.stats_key())
    if key not in lm.cache:
        # linalg.inv returns a column-major result; products with it are then up to 30x slower.
        lm.cache[key] = torch.linalg.inv(layer_second_moment(lm, hparams, layer)).contiguous()
    note_statistics(lm, hparams, layer)
    return lm.cache[key]


def second_moment_cholesky(
    lm: LM, hparams: StatisticsHyperParams, layer: int
) -> torch.Tensor | None:
    """The lower Cholesky factor of a layer's C, computed once per model and statistics and
    kept on `lm.cache` (half the work of one direct solve); None where C is singular."""
    key = ("cholesky_mom2", layer, hparams.stats_key())
    if key not in lm.cache:
        factor, info = torch.linalg.cholesky_ex(layer_second_moment(lm, hparams, layer))
        lm.cache[key] = factor if int(info) == 0 else None
    note_statistics(lm, hparams, layer)
    return lm.cache[key]


def note_statistics(lm: LM, hparams: StatisticsHyperParams, layer: int) -> None:
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
    return lookup_indices(lm, [(prefix, text, subject)], fact_token)[0]


def lookup_indices(lm: LM, texts: list[tuple[str, str, str]], fact_token: str) -> list[int]:
    """`lookup_index` of each `(prefix, text, subject)`, the texts tokenised in one call."""
    ends = []
    for prefix, text, subject in texts:
        start = text.find(subject)
        if start < 0:
            raise ValueError(f"subject {subject!r} does not occur in prompt {text!r}")
        ends.append(prefix + text[: len(text) if fact_token == "last" else start + len(subject)])
    return [len(ids) - 1 for ids in encode_prompts(lm, ends)]


def encode_prompts(lm: LM, texts: list[str]) -> list[list[int]]:
    """`lm.encode_prompt` of each text, in one call of the tokenizer."""
    start = lm.start_ids
    return [start + ids for ids in lm.encode_many(texts)]


@torch.no_grad()
def lookup_activations(
    lm: LM,
    requests: list[EditRequest],
    prefixes: list[str],
    fact_token: str,
    key_layers: list[int],
    sites: list[str] = (),
) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """At the edited token (`lookup_index`) of each request after each prefix, in one forward
    pass over all of them (in batches of what fits): the keys (inputs of the MLP output
    projection) of each layer in `key_layers` and the output of each module in `sites`, as
    `(requests, prefixes, width)` float32 tensors. The tokens after the edited one cannot
    change these: each prompt runs only up to it."""
    items = [(prefix, request.text, request.subject) for request in requests for prefix in prefixes]
    positions = lookup_indices(lm, items, fact_token)
    texts = [
        ids[: at + 1]
        for ids, at in zip(
            encode_prompts(lm, [prefix + text for prefix, text, _ in items]), positions, strict=True
        )
    ]

    def passes(budget: int) -> Iterator[tuple[torch.Tensor, Callable[[], None]]]:
        for chunk in token_chunks(range(len(items)), [len(t) for t in texts], budget):
            ids, mask = lm.pad([texts[i] for i in chunk])
            at = torch.tensor([positions[i] for i in chunk])
            run = partial(lm.model.base_model, input_ids=ids, attention_mask=mask, use_cache=False)
            yield at, run

    return _read_at_edited_token(lm, key_layers, sites, passes, (len(requests), len(prefixes)))


@torch.no_grad()
def lookup_from_block(
    lm: LM,
    inputs: list[BlockInput],
    key_layers: list[int],
    sites: list[str] = (),
    keep: int | None = None,
    change: WeightDelta | None = None,
) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor], list[BlockInput] | None]:
    """`lookup_activations` of the same requests and prefixes, each request's prompts run from
    its `BlockInput` on (the model's blocks below that input's block must be those the input
    was taken with; the blocks from it up may have changed since). Given `change`, the change
    of the inputs' projection not written into the model, it is added to the projection's
    output instead (the projection's weights are then those the input was taken with).

    Given `keep` (a block the pass runs, below or at the highest read, whose MLP output
    projection's output adds to its own), also returns each request's `BlockInput` above that
    block, taken in the same pass: a later lookup, once that projection has changed, starts
    there (MEMIT's spread measures each layer after the update of the one below)."""
    layer, projection = inputs[0].layer, inputs[0].projection
    width = max(found.hidden.shape[1] for found in inputs)
    sizes = [len(found.at) * width for found in inputs]
    pending: list[tuple[list[BlockInput], Callable[[], dict[str, torch.Tensor]]]] = []

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(
            tensor, (0, 0) * (tensor.dim() - 2) + (0, width - tensor.shape[1])
        )

    def passes(budget: int) -> Iterator[tuple[torch.Tensor, Callable[[], None]]]:
        for chunk in token_chunks(inputs, sizes, budget):
            hidden = torch.cat([padded(found.hidden) for found in chunk])
            if projection is not None:
                keys = torch.cat([padded(found.keys) for found in chunk])
                if change is not None:
                    hidden = hidden + projection_change(lm, change, keys).to(hidden.dtype)
                else:
                    values = torch.cat([padded(found.values) for found in chunk])
                    hidden = hidden + (lm.model.get_submodule(projection)(keys) - values)
            mask = torch.cat([padded(found.mask) for found in chunk])
            positions = torch.cat([padded(found.positions) for found in chunk])

            def run(hidden=hidden, mask=mask, positions=positions, chunk=chunk) -> None:
                # Hooks go in before the blocks below `layer` are left out (which renumbers them).
                kept = nullcontext(None) if keep is None else capture_start(lm, keep, True)
                with kept as found:
                    if found is not None:
                        pending.append((chunk, found))
                    with start_at_block(lm.model, lm.layout.blocks, layer, hidden):
                        lm.model.base_model(
                            input_ids=torch.zeros_like(mask),
                            attention_mask=mask,
                            position_ids=positions,
                            use_cache=False,
                        )

            yield torch.cat([found.at for found in chunk]), run

    shape = (len(inputs), len(inputs[0].at))
    seen, outputs = _read_at_edited_token(lm, key_layers, sites, passes, shape)
    if keep is None:
        return seen, outputs, None
    kept = [item for chunk, found in pending for item in _kept_inputs(lm, chunk, keep, found())]
    return seen, outputs, kept


def projection_change(lm: LM, change: WeightDelta, inputs: torch.Tensor) -> torch.Tensor:
    """What `change` (of a projection's weight) adds to the projection's output at `inputs`
    (float32; a low-rank change as two thin products)."""
    inputs = inputs.float()
    if change.dense is not None:
        weight = change.dense.to(inputs.device)
        return inputs @ (weight if lm.layout.conv1d else weight.T)
    left, right = change.left.to(inputs.device), change.right.to(inputs.device)
    # GPT-2's Conv1D stores (in × out), nn.Linear (out × in).
    return (inputs @ left) @ right if lm.layout.conv1d else (inputs @ right.T) @ left.T


def _kept_inputs(
    lm: LM, chunk: list[BlockInput], layer: int, found: dict[str, torch.Tensor]
) -> list[BlockInput]:
    """The `BlockInput` above block `layer` of each input of `chunk`, from what `capture_start`
    `found` over the chunk's rows (padded)."""
    start, kept, projection = 0, [], lm.layout.mlp_out_name(layer)
    for given in chunk:
        rows, width = slice(start, start + len(given.at)), given.hidden.shape[1]
        hidden, keys, values = (found[name][rows, :width] for name in ("hidden", "keys", "values"))
        kept.append(
            BlockInput(
                layer + 1, hidden, given.mask, given.positions, given.at, projection, keys, values
            )
        )
        start += len(given.at)
    return kept


def _read_at_edited_token(
    lm: LM,
    key_layers: list[int],
    sites: list[str],
    passes: Callable[[int], Iterator[tuple[torch.Tensor, Callable[[], None]]]],
    shape: tuple[int, int],
) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """The keys of `key_layers` and the outputs of `sites` at positions `at` of each row of
    each pass `(at, run)` of `passes(budget)` (batches of at most `budget` tokens, what a
    backward pass from the lowest block read fits; `run()` runs the model, which stops after
    the highest block read), as `(*shape, width)` float32 tensors."""
    model = lm.model
    names = [lm.layout.mlp_out_name(layer) for layer in key_layers]
    last = max([*key_layers, *(_block_of(lm, site) for site in sites)])
    budget = backward_tokens(lm, min(key_layers or [last]))
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in key_layers}
    outs: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    for at, run in passes(budget):
        # The hooks go in before a pass cuts the blocks below out (which renumbers them).
        with capture(model, names, "input") as seen, capture(model, list(sites)) as written:
            with stop_after(model, lm.layout.block(last)):
                run()
        for layer, name in zip(key_layers, names, strict=True):
            keys[layer].append(_at(seen[name], at))
        for site in sites:
            outs[site].append(_at(written[site], at))
    return (
        {layer: torch.cat(parts).view(*shape, -1) for layer, parts in keys.items()},
        {site: torch.cat(parts).view(*shape, -1) for site, parts in outs.items()},
    )


def _at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Row i of `values` (rows, seq, width) at position `positions[i]`, float32."""
    rows = torch.arange(len(positions), device=values.device)
    return values[rows, positions.to(values.device)].float()


def _block_of(lm: LM, module: str) -> int:
    """The block a module path lies in."""
    prefix = lm.layout.blocks + "."
    return int(module.removeprefix(prefix).split(".")[0])


@dataclass
class ValueResult:
    """The delta added to one site's output that makes the target likely, how the optimisation
    went, and what the unedited model computes at the edited token: the site's output after
    the bare prompt and, per asked layer, the keys after each prefix (prefixes × in)."""

    delta: torch.Tensor
    initial_output: torch.Tensor
    steps: int
    target_nll: float
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    block_input: BlockInput | None = None


@dataclass
class BlockInput:
    """The input of block `layer` over one request's prompts after each prefix, up to the
    edited token, from the value pass (rows × tokens, padded; `at`: the edited token's
    position in each row). A lookup at a higher layer, once the edits from block `layer` up
    are applied, starts there (`lookup_from_block`): the blocks below stay unedited.

    With `projection` (the MLP output projection of block `layer - 1`, an edited one, whose
    output adds to its block's), `hidden` is that input as it was before the projection
    changed, and `keys` and `values` the projection's input and output then, over the same
    tokens: the lookup adds the projection's change (`projection(keys) - values` with the
    change written into the model, or the change it is given applied to `keys`) and does not
    run block `layer - 1` again."""

    layer: int
    hidden: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    at: torch.Tensor
    projection: str | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


def optimize_value(
    lm: LM,
    request: EditRequest,
    layer: int,
    prefixes: list[str],
    hparams: LocateHyperParams,
    site: str,
    essence_prompt: str = "{} is a",
    key_layers: list[int] = (),
) -> ValueResult:
    """`optimize_values` for one request and the one site `site` (ROME Eq. 4)."""
    return optimize_values(
        lm, [request], layer, prefixes, hparams, [site], essence_prompt, key_layers
    )[0][0]


def optimize_values(
    lm: LM,
    requests: list[EditRequest],
    layer: int,
    prefixes: list[str],
    hparams: LocateHyperParams,
    sites: list[str],
    essence_prompt: str = "{} is a",
    key_layers: list[int] = (),
    input_of: int | None = None,
) -> list[list[ValueResult]]:
    """For each request, vectors delta_s that, added to the outputs of the modules `sites` (all
    in block `layer`) at the edited token, make `target_new` likely after every prefix
    (ROME Eq. 4; several sites at once as in PMET). One list per request, one result per site;
    each also carries the unedited keys of `key_layers` (each ≤ `layer`) at the edited token
    and, given `input_of` (≤ `layer`), that block's input over the prompts (`BlockInput`).
    A request with `extra_targets` (Multi-Label Edit) makes all its targets likely: its target
    NLL is the mean over targets and prefixes.

    Loss per request = mean NLL of the target tokens + kl_factor * KL(new || old) of the
    next-token distribution at the edited token of `essence_prompt` (keeps what the subject
    "is") + for each site, v_weight_decay times `delta_decay` of its delta. Each delta is
    clamped to clamp_norm_factor times its site's unedited output norm. A request stops once
    each of its prompts' mean target NLL is below `v_stop_nll` (`v_stop` 'nll') or once each
    target token is the most probable one after each prompt ('most_probable'), or, with
    `v_patience`, once its worst prompt's NLL has not reached a new low for that many steps.

    The requests are optimised together, each with its own deltas (the losses are summed, so
    the gradients do not mix), in chunks of about `v_batch_tokens` tokens (None: what fits the
    device, `kedit.methods._memory`). Only what a delta reaches is computed at each step: the
    positions before the edited token run once and are fed to every step as cached keys and
    values, the blocks below `layer` run once, and so does block `layer` itself where the
    delta adds to its output (`adds_to_block_output`); logits are computed only where the loss
    reads them.
    """
    budget = hparams.v_batch_tokens or backward_tokens(lm, layer)
    tokens = [
        (len(prefixes) * len(request.targets) + 1)
        * len(lm.encode_prompt(prefixes[-1] + request.text))
        for request in requests
    ]
    results: list[list[ValueResult]] = []
    for chunk in token_chunks(requests, tokens, budget):
        batch = _ValueBatch.build(lm, chunk, prefixes, essence_prompt, hparams.fact_token)
        search = _ValueSearch(
            lm, batch, len(chunk), layer, sites, hparams, list(key_layers), input_of
        )
        results.extend(search.run())
    return results


@dataclass
class _PrefixStates:
    """The keys and values of each context prefix's tokens at every layer (prefixes × heads ×
    width × head dim, left-padded to the longest prefix), for the weights the model has now."""

    ids: list[list[int]]
    width: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]


def _per_weights(lm: LM, key: tuple, compute: Callable[[], Any]) -> Any:
    """`compute()`, kept on `lm.cache` under `key` with `weights_version`, which an edit changes
    and its undo restores: work that depends on the weights only is done once per version."""
    version = weights_version(lm.model)
    cached = lm.cache.get(key)
    if cached is not None and cached[0] == version:
        return cached[1]
    value = compute()
    lm.cache[key] = (version, value)
    return value


def _prefix_batch(lm: LM, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """The prefixes' token ids left-padded to the longest, as the model's keyword arguments."""
    width = max(len(tokens) for tokens in ids)
    pad = lm.tokenizer.pad_token_id
    tokens = torch.tensor([[pad] * (width - len(t)) + t for t in ids], device=lm.device)
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in ids], device=lm.device)
    return {
        "input_ids": tokens,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
    }


def prefix_states(lm: LM, prefixes: list[str]) -> _PrefixStates | None:
    """The `_PrefixStates` of `prefixes` (None where none has a token: GPT-2's empty prefix).

    They do not depend on the edit, so every request and step shares them: computed once per
    model and weights (`_per_weights`)."""
    ids = [lm.encode_prompt(prefix) for prefix in prefixes]
    width = max(len(tokens) for tokens in ids)
    if not width:
        return None

    def compute() -> _PrefixStates:
        with torch.no_grad():
            out = lm.model.base_model(**_prefix_batch(lm, ids), use_cache=True)
        return _PrefixStates(ids, width, _cache_tensors(out))

    return _per_weights(lm, ("prefix_states", tuple(prefixes)), compute)


def prefix_block_input(
    lm: LM, states: _PrefixStates, layer: int, additive: bool
) -> dict[str, torch.Tensor]:
    """At the prefixes' tokens (prefixes × width × ..., laid out as `states`): the input of
    block `layer` (`hidden`) and those tokens' `positions`; with `additive`, block `layer`'s
    output instead, and its MLP output projection's input (`keys`) and output (`values`), as
    `BlockInput` keeps them. Once per model and weights."""

    def compute() -> dict[str, torch.Tensor]:
        batch = _prefix_batch(lm, states.ids)
        with torch.no_grad(), capture_start(lm, layer, additive) as found:
            with stop_after(lm.model, lm.layout.block(layer)):
                lm.model.base_model(**batch, use_cache=False)
        return {**found(), "positions": batch["position_ids"]}

    key = ("prefix_block_input", tuple(map(tuple, states.ids)), layer, additive)
    return _per_weights(lm, key, compute)


@contextmanager
def capture_start(
    lm: LM, layer: int, additive: bool
) -> Iterator[Callable[[], dict[str, torch.Tensor]]]:
    """Record, over the forward passes inside, what a lookup that starts from block `layer`
    needs (`BlockInput`): the block's input (`hidden`), or with `additive` its output and its
    MLP output projection's input (`keys`) and output (`values`). Yields a function that
    returns them (call it once the pass has run, inside the block or after)."""
    block = lm.layout.block(layer)
    projections = [lm.layout.mlp_out_name(layer)] if additive else []
    side = "output" if additive else "input"
    with (
        capture(lm.model, [block], side) as seen,
        capture(lm.model, projections, "input") as keys,
        capture(lm.model, projections) as values,
    ):

        def found() -> dict[str, torch.Tensor]:
            named = {"hidden": seen[block]}
            for projection in projections:
                named.update(keys=keys[projection], values=values[projection])
            return named

        yield found


@dataclass
class _ValueBatch:
    """The rows of a value optimisation: for each request, one row per target and prefix (prompt
    and all target tokens but the last) and its essence row. Each row is split at the edited
    token into a context (run once) and a suffix (right-padded, run every step). The context is
    the row's prefix's tokens, whose keys and values are shared (`prefix_states`), then the rest
    (left-padded)."""

    owner: torch.Tensor  # request index of each row
    is_rewrite: torch.Tensor  # True for prompt rows, False for essence rows
    at: torch.Tensor  # position of the edited token in the suffix
    first_rows: torch.Tensor  # each request's first row
    key_rows: torch.Tensor  # each request's prompt rows of its first target (requests × prefixes)
    prefixes: _PrefixStates | None
    prefix_of: torch.Tensor  # index of each row's prefix
    context_mask: torch.Tensor  # [the prefix's positions the row shares | the rest]
    rest_ids: torch.Tensor
    rest_positions: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    suffix_positions: torch.Tensor
    target_ids: torch.Tensor  # (rows, longest target), padded; zeros on essence rows
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
        essence_of = [essence_prompt.replace("{}", request.subject) for request in requests]
        texts = []  # (prefix, text, subject) of each row: prompt rows by target, then essence
        target_texts, first_rows, key_rows = [], [], []
        for request, essence in zip(requests, essence_of, strict=True):
            first_rows.append(len(texts))
            key_rows.append(list(range(len(texts), len(texts) + len(prefixes))))
            for target in request.targets:
                target_texts.append(target)
                texts.extend((prefix, request.text, request.subject) for prefix in prefixes)
            texts.append(("", essence, request.subject))
        prompts = encode_prompts(lm, [prefix + text for prefix, text, _ in texts])
        lookups = lookup_indices(lm, texts, fact_token)
        encoded = lm.encode_many(target_texts)
        rows, targets, owners, prefix_of = [], [], [], []
        row = 0
        for index, request in enumerate(requests):
            for _ in request.targets:
                target_ids = encoded.pop(0)
                for number in range(len(prefixes)):
                    prompt_ids = prompts[row]
                    rows.append(prompt_ids + target_ids[:-1])
                    targets.append((len(prompt_ids) - 1, target_ids))
                    owners.append(index)
                    prefix_of.append(number)
                    row += 1
            rows.append(prompts[row])
            targets.append(None)
            owners.append(index)
            # Any prefix serves the essence row: it shares only tokens that match exactly.
            prefix_of.append(0)
            row += 1
        # A row whose subject ends at its first token has no context; then none is cached.
        cuts = lookups if min(lookups) > 0 else [0] * len(rows)
        states = prefix_states(lm, prefixes) if max(cuts) else None
        width = states.width if states else 0
        shared = [
            _common_length(states.ids[p], row, cut) if states else 0
            for row, cut, p in zip(rows, cuts, prefix_of, strict=True)
        ]
        pad = lm.tokenizer.pad_token_id
        rest_len = max(cut - common for cut, common in zip(cuts, shared, strict=True))
        suffix_len = max(len(row) - cut for row, cut in zip(rows, cuts, strict=True))
        longest = max(len(t[1]) for t in targets if t is not None)
        fields: dict[str, list[list]] = {
            name: []
            for name in (
                "context_mask",
                "rest_ids",
                "rest_positions",
                "suffix_ids",
                "suffix_mask",
                "target_ids",
                "target_mask",
                "target_positions",
            )
        }
        for row, cut, common, p, target in zip(rows, cuts, shared, prefix_of, targets, strict=True):
            # [shared prefix positions, left-padded to the longest prefix | rest, left-padded]
            start = width - len(states.ids[p]) if states else 0
            lead = rest_len - (cut - common)
            fields["context_mask"].append(
                [0] * start
                + [1] * common
                + [0] * (width - start - common + lead)
                + [1] * (cut - common)
            )
            fields["rest_ids"].append([pad] * lead + row[common:cut])
            fields["rest_positions"].append([0] * lead + list(range(common, cut)))
            tail = suffix_len - (len(row) - cut)
            fields["suffix_ids"].append(row[cut:] + [pad] * tail)
            fields["suffix_mask"].append([1] * (len(row) - cut) + [0] * tail)
            first, ids = target or (0, [])
            fields["target_ids"].append(ids + [0] * (longest - len(ids)))
            fields["target_mask"].append([1.0] * len(ids) + [0.0] * (longest - len(ids)))
            fields["target_positions"].append(
                [min(first - cut + j, suffix_len - 1) if target else 0 for j in range(longest)]
            )
        device = lm.device
        # typed: a field can be empty (no context rows when every subject starts its prompt)
        tensors = {
            name: torch.tensor(
                values, device=device, dtype=torch.float if name == "target_mask" else torch.long
            )
            for name, values in fields.items()
        }
        cut_t = torch.tensor(cuts)
        return cls(
            owner=torch.tensor(owners, device=device),
            is_rewrite=torch.tensor([t is not None for t in targets], device=device),
            at=(torch.tensor(lookups) - cut_t).to(device),
            prefixes=states,
            prefix_of=torch.tensor(prefix_of, device=device),
            suffix_positions=(cut_t[:, None] + torch.arange(suffix_len)).to(device),
            first_rows=torch.tensor(first_rows, device=device),
            key_rows=torch.tensor(key_rows, device=device),
            nll_floor=torch.tensor([math.log(len(r.targets)) for r in requests], device=device),
            **tensors,
        )


def _common_length(prefix: list[int], row: list[int], cut: int) -> int:
    """How many leading tokens of `row`, before position `cut`, are the prefix's own tokens
    (tokenising prefix and prompt together can merge the prefix's last token with the
    prompt's first)."""
    length = 0
    while length < min(len(prefix), cut) and prefix[length] == row[length]:
        length += 1
    return length


@dataclass
class _Rows:
    """The rows of the batch that the current steps run (those of the unfinished requests),
    with everything a step reads of them, gathered once until the next request finishes."""

    rows: torch.Tensor
    owner: torch.Tensor
    where: tuple[torch.Tensor, torch.Tensor]  # (row, suffix position) of each edited token
    ids: torch.Tensor
    mask: torch.Tensor  # [context | suffix]
    positions: torch.Tensor
    context: _ContextCache | None  # None where no block runs or no row has a context
    start: torch.Tensor  # where the steps start: the edited block's output, or its input
    read: tuple[torch.Tensor, torch.Tensor]  # positions whose logits the losses read
    n_target_reads: int  # the first reads: each prompt row's target positions, then essences
    target_ids: torch.Tensor  # (prompt rows, longest target)
    target_mask: torch.Tensor
    token_shares: torch.Tensor  # each target token's share of its row's mean NLL
    prompt_owner: torch.Tensor
    essence_owner: torch.Tensor
    row_shares: torch.Tensor  # each prompt row's share of its request's mean NLL

    def target_nll(
        self, logp: torch.Tensor, n_requests: int, most_probable: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per request, the mean over its prompt rows of each row's mean target-token NLL, the
        largest row NLL (detached) and, if asked, whether every target token is the most
        probable one in every row; `logp` are the log-probabilities at the reads."""
        rows, width = self.target_ids.shape
        picked = logp[: self.n_target_reads].view(rows, width, -1)
        token_logp = picked.gather(2, self.target_ids[..., None]).squeeze(-1)
        nll_rows = -(token_logp * self.token_shares).sum(1)
        zeros = torch.zeros(n_requests, device=logp.device)
        nll_mean = zeros.index_add(0, self.prompt_owner, nll_rows * self.row_shares)
        nll_max = torch.full_like(zeros, float("-inf")).scatter_reduce(
            0, self.prompt_owner, nll_rows.detach(), "amax"
        )
        if not most_probable:
            return nll_mean, nll_max, None
        missed = (picked.detach().argmax(-1) != self.target_ids) & (self.target_mask > 0)
        misses = zeros.index_add(0, self.prompt_owner, missed.any(1).float())
        return nll_mean, nll_max, misses == 0

    def essence_logp(self, logp: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities at the edited token of each essence row."""
        return logp[self.n_target_reads :]


def _cache_tensors(output: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer `(keys, values)` of the KV cache a forward pass returned (the layered cache of
    recent transformers versions and the older lists of tensors)."""
    cache = output.cache if "cache" in output else output.past_key_values
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


class _ContextCache:
    """A KV cache object that holds the context's keys and values (per layer) and hands them to
    each pass afresh: a pass appends its own positions' keys and values to the cache it gets,
    so before each one the layers are set back to the context's tensors (no copy)."""

    def __init__(self, context: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        from transformers import DynamicCache

        self.context = context
        self.cache = DynamicCache(ddp_cache_data=context)

    def fresh(self) -> Any:
        layers = getattr(self.cache, "layers", None)
        if layers is None:  # transformers before 4.56: lists of tensors
            self.cache.key_cache[:] = [keys for keys, _ in self.context]
            self.cache.value_cache[:] = [values for _, values in self.context]
            return self.cache
        for layer, (keys, values) in zip(layers, self.context, strict=True):
            layer.keys, layer.values = keys, values
        return self.cache


class _ValueSearch:
    """The value optimisation of one batch of requests (ROME Eq. 4), in the order it runs.

    Once: `_run_first` runs the unedited model over every row and keeps what no delta reaches:
    the keys and values of the positions before each row's edited token (causal attention
    keeps a delta out of them) and where the steps start: the edited block's output where the
    delta adds to it (`adds_to_block_output`), else its input; and v₀, each site's unedited
    output at the edited token of each request's first (bare) prompt, and the keys asked for.
    Then each step: `_forward` adds the unfinished requests' deltas at the edited tokens and
    runs the blocks above (`_editing`, `kedit.methods._above`) to the log-probabilities the
    losses read, `_stop` ends the requests that meet the stopping rule, `_loss` sums ROME Eq.
    4's terms over the others, `_descend` takes one step (a first step along the gradient's
    sign, then Adam) and `_clamp` bounds each delta's norm.
    """

    def __init__(
        self,
        lm: LM,
        batch: _ValueBatch,
        n_requests: int,
        layer: int,
        sites: list[str],
        hparams: LocateHyperParams,
        key_layers: list[int],
        input_of: int | None = None,
    ) -> None:
        self.lm, self.batch, self.n_requests = lm, batch, n_requests
        self.layer, self.sites, self.hparams = layer, sites, hparams
        self.additive = len(sites) == 1 and adds_to_block_output(lm, layer, sites[0])
        self.above = Above(lm, layer + 1 if self.additive else layer)
        device = lm.device
        self.input_of = input_of
        self.context, self.start, self.initial, self.keys = self._run_first(key_layers)
        self.deltas = [torch.zeros_like(start, requires_grad=True) for start in self.initial]
        self.optimizer = torch.optim.Adam(self.deltas, lr=hparams.v_lr)
        self.max_norms = [hparams.clamp_norm_factor * start.norm(dim=1) for start in self.initial]
        self.reference: torch.Tensor | None = None  # the unedited essence distributions
        self.active = torch.ones(n_requests, dtype=torch.bool, device=device)
        self.stop_nll = hparams.v_stop_nll + batch.nll_floor  # per request (`v_stop` 'nll')
        self.lowest = torch.full((n_requests,), float("inf"), device=device)
        self.stale = torch.zeros(n_requests, dtype=torch.long, device=device)
        self.done: list[tuple[int, float] | None] = [None] * n_requests
        self.current: _Rows | None = self._select()  # the rows of the unfinished requests

    def run(self) -> list[list[ValueResult]]:
        """Optimise until every request has stopped; one `ValueResult` per request and site."""
        most_probable = self.hparams.v_stop == "most_probable"
        with self._editing():
            for step in range(self.hparams.v_steps + 1):
                if self.current is None:
                    self.current = self._select()
                rows = self.current
                logp = self._forward(rows)
                nll_mean, nll_max, all_most_probable = rows.target_nll(
                    logp, self.n_requests, most_probable
                )
                essence_logp = rows.essence_logp(logp)
                if self.reference is None:  # step 0 runs with zero deltas: the unedited model
                    self.reference = essence_logp.detach()  # one row per request, in order
                if self._stop(step, nll_mean, nll_max, all_most_probable):
                    break
                self._descend(self._loss(nll_mean, essence_logp, rows.essence_owner), step)
                self._clamp()
        return [
            [
                ValueResult(
                    delta[r].detach(),
                    start[r],
                    self.done[r][0],
                    self.done[r][1],
                    {layer: keys[r] for layer, keys in self.keys.items()},
                    self.block_inputs[r] if self.block_inputs else None,
                )
                for delta, start in zip(self.deltas, self.initial, strict=True)
            ]
            for r in range(self.n_requests)
        ]

    def _run_first(
        self, key_layers: list[int]
    ) -> tuple[
        list[tuple[torch.Tensor, torch.Tensor]] | None,
        torch.Tensor,
        list[torch.Tensor],
        dict[int, torch.Tensor],
    ]:
        """One pass of the unedited model over every row's rest of the context and suffix,
        after the prefixes' shared keys and values. Returns the context's keys and values per
        layer (None where no row has any context or the steps run no block); where the steps
        start (the suffix's block-`layer` output where the delta adds to it, else its input);
        each site's unedited output v₀ at the edited token of each request's first (bare)
        prompt (n_requests × width, float32); and the keys of `key_layers` at the edited token
        of each request's prompt rows (n_requests × prefixes × in, float32). Sets
        `block_inputs` (one `BlockInput` per request, given `input_of`; else empty)."""
        layout, batch, model = self.lm.layout, self.batch, self.lm.model
        block = layout.block(self.layer)
        names = [layout.mlp_out_name(layer) for layer in key_layers]
        lower = nullcontext(None)
        if self.input_of is not None:
            additive = adds_to_block_output(
                self.lm, self.input_of, layout.mlp_out_name(self.input_of)
            )
            lower = capture_start(self.lm, self.input_of, additive)
        n_rest, n_context = batch.rest_ids.shape[1], batch.context_mask.shape[1]
        past = {}
        if batch.prefixes is not None:
            rows = batch.prefix_of
            shared = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in batch.prefixes.kv]
            past = {self.above.cache_argument: _ContextCache(shared).fresh()}
        start = "output" if self.additive else "input"
        # The steps need the context's keys and values at every block they run; where they
        # run none (the edited block is the last), nothing above the edited block is needed.
        keeps_context = n_context > 0 and self.above.runs_blocks
        with torch.no_grad(), capture(model, [block], start) as seen:
            with (
                capture(model, self.sites) as out,
                capture(model, names, "input") as inputs,
                lower as lower_found,
            ):
                with nullcontext() if keeps_context else stop_after(model, block):
                    result = model.base_model(
                        input_ids=torch.cat([batch.rest_ids, batch.suffix_ids], dim=1),
                        attention_mask=torch.cat([batch.context_mask, batch.suffix_mask], dim=1),
                        position_ids=torch.cat([batch.rest_positions, batch.suffix_positions], 1),
                        use_cache=keeps_context or bool(past),
                        **past,
                    )
        context = None
        if keeps_context:
            context = [
                (k[..., :n_context, :], v[..., :n_context, :]) for k, v in _cache_tensors(result)
            ]
        first_rows = batch.first_rows
        at = batch.at + n_rest
        initial = [
            _at(out[site][first_rows.to(out[site].device)], at[first_rows]) for site in self.sites
        ]
        prompts = batch.key_rows.flatten()
        keys = {
            layer: _at(inputs[name][prompts.to(inputs[name].device)], at[prompts]).view(
                self.n_requests, -1, inputs[name].shape[-1]
            )
            for layer, name in zip(key_layers, names, strict=True)
        }
        self.block_inputs = [] if lower_found is None else self._block_input(lower_found(), at)
        return context, seen[block][:, n_rest:], initial, keys

    def _block_input(self, found: dict[str, torch.Tensor], at: torch.Tensor) -> list[BlockInput]:
        """Per request, the `BlockInput` of block `input_of` (or, where the edit there adds to
        its output, of the block above) over its prompt rows, from what the value pass `found`
        over the rest of the context and the suffix and from the prefixes'
        (`prefix_block_input`), cut after the last edited token."""
        batch, layer = self.batch, self.input_of
        additive = "keys" in found
        prompts = batch.key_rows.flatten()
        mask = torch.cat([batch.context_mask, batch.suffix_mask], dim=1)[prompts]
        positions = torch.cat([batch.rest_positions, batch.suffix_positions], dim=1)[prompts]
        found = {name: tensor[prompts.to(tensor.device)] for name, tensor in found.items()}
        at = at[prompts]
        if batch.prefixes is not None:
            shared = prefix_block_input(self.lm, batch.prefixes, layer, additive)
            rows = batch.prefix_of[prompts]
            found = {
                name: torch.cat([shared[name][rows.to(tensor.device)], tensor], dim=1)
                for name, tensor in found.items()
            }
            positions = torch.cat([shared["positions"][rows], positions], dim=1)
            at = at + batch.prefixes.width
        end = int(at.max()) + 1
        per_request = len(prompts) // self.n_requests
        projection = self.lm.layout.mlp_out_name(layer) if additive else None
        return [
            BlockInput(
                layer + 1 if additive else layer,
                found["hidden"][rows, :end],
                mask[rows, :end],
                positions[rows, :end],
                at[rows],
                projection,
                *(found[name][rows, :end] for name in ("keys", "values") if additive),
            )
            for rows in torch.arange(len(prompts)).split(per_request)
        ]

    def _select(self) -> _Rows:
        """The rows of the unfinished requests."""
        rows = torch.arange(len(self.batch.owner), device=self.lm.device)
        return self._select_rows(rows[self.active[self.batch.owner]], self.start)

    def _select_rows(self, rows: torch.Tensor, start: torch.Tensor) -> _Rows:
        """Rows `rows` of the batch and what a step reads of them; `start` is where the steps
        start, for every row of the batch."""
        batch = self.batch
        every = len(rows) == len(batch.owner)

        def take(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if every else tensor[rows.to(tensor.device)]

        mask = take(batch.suffix_mask)
        context = None
        if self.context is not None:
            mask = torch.cat([take(batch.context_mask), mask], dim=1)
            if self.above.runs_blocks:
                context = _ContextCache([(take(k), take(v)) for k, v in self.context])
        owner, at = take(batch.owner), take(batch.at)
        prompt = take(batch.is_rewrite)
        prompt_rows = prompt.nonzero().flatten()
        essence_rows = (~prompt).nonzero().flatten()
        target_positions = take(batch.target_positions)[prompt_rows]
        width = target_positions.shape[1]
        read_rows = torch.cat([prompt_rows.repeat_interleave(width), essence_rows])
        read_cols = torch.cat([target_positions.flatten(), at[essence_rows]])
        target_mask = take(batch.target_mask)[prompt_rows]
        prompt_owner = owner[prompt_rows]
        prompts_per_request = torch.zeros(self.n_requests, device=owner.device).index_add(
            0, prompt_owner, torch.ones_like(prompt_owner, dtype=torch.float)
        )
        return _Rows(
            rows=rows,
            owner=owner,
            where=(torch.arange(len(rows), device=rows.device), at),
            ids=take(batch.suffix_ids),
            mask=mask,
            positions=take(batch.suffix_positions),
            context=context,
            start=take(start),
            read=(read_rows, read_cols),
            n_target_reads=len(prompt_rows) * width,
            target_ids=take(batch.target_ids)[prompt_rows],
            target_mask=target_mask,
            token_shares=target_mask / target_mask.sum(1, keepdim=True),
            prompt_owner=prompt_owner,
            essence_owner=owner[essence_rows],
            row_shares=1 / prompts_per_request[prompt_owner],
        )

    def _forward(self, rows: _Rows) -> torch.Tensor:
        """Log-probabilities at the reads of `rows`, the deltas added at the edited tokens."""
        hidden = rows.start
        if self.additive:
            delta = self.deltas[0]
            added = delta[rows.owner.to(delta.device)].to(hidden.device, hidden.dtype)
            where = tuple(index.to(hidden.device) for index in rows.where)
            hidden = hidden.index_put(where, added, accumulate=True)
        cache = None if rows.context is None else rows.context.fresh()
        normed = self.above(hidden, rows.ids, rows.mask, rows.positions, cache)
        return torch.log_softmax(read_logits(self.lm, normed, *rows.read), dim=-1)

    @contextmanager
    def _editing(self) -> Iterator[None]:
        """Inside: forward passes start above the edited block (or at it, with hooks that add
        each site's delta, where a delta does not simply add to the block's output), and the
        model's parameters take no gradient."""
        model = self.lm.model
        site_hooks = (
            []
            if self.additive
            else [
                replace_output(model, site, self._add_delta(delta))
                for site, delta in zip(self.sites, self.deltas, strict=True)
            ]
        )
        with hooks(frozen(model, []), *site_hooks):
            yield

    def _add_delta(self, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A site hook: adds each row's request's `delta` at the row's edited token."""

        def add_delta(output: torch.Tensor) -> torch.Tensor:
            rows = self.current
            where = tuple(index.to(output.device) for index in rows.where)
            added = delta[rows.owner.to(delta.device)].to(output.device, output.dtype)
            return output.index_put(where, added, accumulate=True)

        return add_delta

    def _stop(
        self,
        step: int,
        nll_mean: torch.Tensor,
        nll_max: torch.Tensor,
        most_probable: torch.Tensor | None,
    ) -> bool:
        """End the requests that meet the stopping rule (`v_stop`, `v_patience`), or all at the
        last step, recording their step and mean NLL; whether every request has ended."""
        hparams = self.hparams
        # Decided on the device, read back once: one sync per step, not per request.
        if hparams.v_stop == "most_probable":
            reached = most_probable
        else:
            reached = nll_max < self.stop_nll.to(nll_max.device)
        if hparams.v_patience:
            lower = nll_max < self.lowest
            self.lowest = torch.where(lower, nll_max, self.lowest)
            self.stale = torch.where(lower, 0, self.stale + 1)
            reached = reached | (self.stale >= hparams.v_patience)
        finished = self.active.clone() if step == hparams.v_steps else self.active & reached
        flags = finished.tolist()
        if any(flags):
            means = nll_mean.detach().tolist()
            for r, flag in enumerate(flags):
                if flag:
                    self.done[r] = (step, means[r])
            self.active &= ~finished
            self.current = None
        return all(done is not None for done in self.done)

    def _loss(
        self, nll_mean: torch.Tensor, essence_logp: torch.Tensor, owners: torch.Tensor
    ) -> torch.Tensor:
        """ROME Eq. 4 summed over the active requests (their gradients do not mix): mean target
        NLL + kl_factor · KL(new ‖ old) on the essence prompt (rows of requests `owners`) +
        v_weight_decay · decay."""
        hparams = self.hparams
        # While every request is active (one request: always), no term needs the mask.
        active = None if all(done is None for done in self.done) else self.active
        kl_rows = (essence_logp.exp() * (essence_logp - self.reference[owners])).sum(1)
        decays = [
            delta_decay(delta, start, hparams.v_weight_decay_form)
            for delta, start in zip(self.deltas, self.initial, strict=True)
        ]
        if active is not None:
            kl_rows, nll_mean = kl_rows * active[owners], nll_mean * active
            decays = [decay[active.to(decay.device)] for decay in decays]
        decay = sum(decay.sum().to(nll_mean.device) for decay in decays)
        return nll_mean.sum() + hparams.kl_factor * kl_rows.sum() + hparams.v_weight_decay * decay

    def _descend(self, loss: torch.Tensor, step: int) -> None:
        """One step on the deltas: along the gradient's sign at step 0 with `v_first_step`,
        else Adam's. Finished requests' deltas stay where they are (Adam's momentum would still
        move them)."""
        finished = ~self.active if any(done is not None for done in self.done) else None
        kept = [] if finished is None else [(d, finished.to(d.device)) for d in self.deltas]
        values = [delta.detach()[rows].clone() for delta, rows in kept]
        self.optimizer.zero_grad()
        loss.backward()
        if step == 0 and self.hparams.v_first_step > 0:
            _first_step(self.deltas, self.initial, self.hparams.v_first_step)
        else:
            self.optimizer.step()
        with torch.no_grad():
            for (delta, rows), value in zip(kept, values, strict=True):
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
