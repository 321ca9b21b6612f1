"""What the locate-then-edit family shares: context prefixes, keys, and the value optimisation.

Notation follows ROME (Meng et al., 2022): a key k is the input of an MLP output projection
W at the subject's last token; a value v is that projection's output there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kedit.hooks import capture, hooks, replace_output, start_at_block, stop_after
from kedit.lm import LM
from kedit.methods.registry import HyperParams, hp
from kedit.requests import EditRequest
from kedit.stats import second_moment


@dataclass
class LocateHyperParams(HyperParams):
    """What ROME, MEMIT and their relatives share: the value optimisation, the statistics and
    the context prefixes."""

    layers: list[int] = hp([5], "Layers whose MLP output projection is edited.")
    v_steps: int = hp(25, "Maximum gradient steps of the value optimisation.")
    v_lr: float = hp(0.5, "Adam learning rate of the value optimisation.")
    v_weight_decay: float = hp(0.5, "Weight decay on the value delta, relative to the output norm.")
    kl_factor: float = hp(0.0625, "Weight of the KL term that keeps '{subject} is a' unchanged.")
    clamp_norm_factor: float = hp(4.0, "Clamp ‖δ‖ to this multiple of the unedited output's norm.")
    v_stop_nll: float = hp(0.05, "Stop once every prompt's mean target NLL is below this.")
    mom2_corpus: str = hp("tinyworld", "Corpus of the second moment: 'tinyworld' or a file.")
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
    fact_token: str = hp("subject_last", "Token whose key is edited (only 'subject_last').")

    ALIASES = {
        "v_num_grad_steps": "v_steps",
        "mom2_dataset": "mom2_corpus",
        "context_template_length_params": "prefix_lengths",
    }
    IGNORED = HyperParams.IGNORED | {"v_loss_layer"}

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: expected at least one layer, got []")
        if self.fact_token != "subject_last":
            raise ValueError(
                f"fact_token: only 'subject_last' is supported, got {self.fact_token!r}"
            )
        for name in ("v_steps", "mom2_n_samples", "mom2_max_length"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("v_lr", "clamp_norm_factor"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")

    def stats_key(self) -> tuple:
        return (self.mom2_corpus, self.mom2_n_samples, self.mom2_max_length, self.mom2_dtype)


def layer_second_moment(lm: LM, hparams: LocateHyperParams, layer: int) -> torch.Tensor:
    """C = E[k kᵀ] of a layer's keys in float64, kept on `lm.cache` after the first use."""
    key = ("mom2", layer, hparams.stats_key())
    if key not in lm.cache:
        corpus, n_samples, max_length, dtype = hparams.stats_key()
        moment = second_moment(
            lm, layer, corpus=corpus, n_samples=n_samples, max_length=max_length, dtype=dtype
        )
        lm.cache[key] = moment.double()
    return lm.cache[key]


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


def subject_end_index(lm: LM, prefix: str, text: str, subject: str) -> int:
    """Token index of the subject's last token in `prefix + text` (the subject is in `text`)."""
    start = text.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {text!r}")
    return len(lm.encode_prompt(prefix + text[: start + len(subject)])) - 1


@torch.no_grad()
def keys_at_subject(
    lm: LM, layer: int, prefixes: list[str], request: EditRequest
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (inputs of the MLP output projection) at the subject's last token.

    Returns `(keys, outputs)`: one row per prefix, the key and the projection's output.
    """
    texts = [prefix + request.text for prefix in prefixes]
    positions = torch.tensor(
        [subject_end_index(lm, prefix, request.text, request.subject) for prefix in prefixes]
    )
    ids, mask = lm.pad([lm.encode_prompt(text) for text in texts])
    name = lm.layout.mlp_out_name(layer)
    with capture(lm.model, [name], "input") as keys, capture(lm.model, [name]) as outs:
        with stop_after(lm.model, name):
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    rows = torch.arange(len(texts))
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
    """`optimize_values` with the one site `site` (ROME Eq. 4)."""
    return optimize_values(lm, request, layer, prefixes, hparams, [site], essence_prompt)[0]


def optimize_values(
    lm: LM,
    request: EditRequest,
    layer: int,
    prefixes: list[str],
    hparams: LocateHyperParams,
    sites: list[str],
    essence_prompt: str = "{} is a",
) -> list[ValueResult]:
    """Find vectors delta_s that, added to the outputs of the modules `sites` (all in block
    `layer`) at the subject's last token, make `target_new` likely after every prefix (ROME
    Eq. 4; several sites at once as in PMET). One result per site, in the order given.

    Loss = mean NLL of the target tokens + kl_factor * KL(new || old) of the next-token
    distribution after `essence_prompt` (keeps what the subject "is") + for each site, weight
    decay on its delta relative to its output norm. Each delta is clamped to clamp_norm_factor
    times its site's unedited output norm. The optimisation stops once every prompt's mean
    target NLL is below `v_stop_nll`. Blocks below `layer` are run once, not at every step.
    """
    steps, stop_nll = hparams.v_steps, hparams.v_stop_nll
    model, layout = lm.model, lm.layout
    target_ids = lm.encode(request.target_new)
    rows, lookup, target_spans = [], [], []
    for prefix in prefixes:
        prompt_ids = lm.encode_prompt(prefix + request.text)
        rows.append(prompt_ids + target_ids[:-1])
        lookup.append(subject_end_index(lm, prefix, request.text, request.subject))
        target_spans.append(len(prompt_ids) - 1)
    essence = essence_prompt.replace("{}", request.subject)
    rows.append(lm.encode_prompt(essence))
    lookup.append(subject_end_index(lm, "", essence, request.subject))
    n_rewrite = len(prefixes)

    ids, mask = lm.pad(rows)
    lookup_t = torch.tensor(lookup, device=lm.device)
    batch = torch.arange(len(rows), device=lm.device)
    positions = torch.tensor(target_spans, device=lm.device)[:, None] + torch.arange(
        len(target_ids), device=lm.device
    )
    target_t = torch.tensor(target_ids, device=lm.device).expand(n_rewrite, -1)
    rewrite_rows = batch[:n_rewrite, None]

    block = layout.block(layer)
    with (
        torch.no_grad(),
        capture(model, [block], "input") as seen,
        capture(model, sites) as out,
    ):
        with stop_after(model, block):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden = seen[block]
    initial = [out[site][0, lookup[0]].float() for site in sites]

    deltas = [torch.zeros_like(start, requires_grad=True) for start in initial]
    optimizer = torch.optim.Adam(deltas, lr=hparams.v_lr)
    max_norms = [hparams.clamp_norm_factor * start.norm() for start in initial]
    init_essence_logp = None

    def adder(delta: torch.Tensor):
        def add_delta(output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[batch, lookup_t] = output[batch, lookup_t] + delta.to(output.dtype)
            return output

        return add_delta

    needs_grad = [p for p in model.parameters() if p.requires_grad]
    for p in needs_grad:
        p.requires_grad_(False)
    step, nll_value = 0, float("inf")
    try:
        # The site hooks go in before the blocks below `layer` are cut out, which renumbers
        # the blocks: a module path resolved afterwards would name a deeper block.
        with hooks(
            *(replace_output(model, s, adder(d)) for s, d in zip(sites, deltas, strict=True)),
            start_at_block(model, layout.blocks, layer, hidden),
        ):
            for step in range(steps + 1):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                rewrite_logp = torch.log_softmax(logits[rewrite_rows, positions].float(), dim=-1)
                token_logp = rewrite_logp.gather(2, target_t[..., None]).squeeze(-1)
                nll_per_prompt = -token_logp.mean(dim=1)
                nll_value = float(nll_per_prompt.detach().mean())
                essence_logits = logits[batch[n_rewrite:], lookup_t[n_rewrite:]]
                essence_logp = torch.log_softmax(essence_logits.float(), dim=-1)
                if init_essence_logp is None:
                    init_essence_logp = essence_logp.detach()
                if step == steps or float(nll_per_prompt.detach().max()) < stop_nll:
                    break
                kl = F.kl_div(
                    init_essence_logp, essence_logp, log_target=True, reduction="batchmean"
                )
                decay = sum(
                    d.norm() ** 2 / start.norm() ** 2
                    for d, start in zip(deltas, initial, strict=True)
                )
                loss = (
                    nll_per_prompt.mean() + hparams.kl_factor * kl + hparams.v_weight_decay * decay
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for delta, max_norm in zip(deltas, max_norms, strict=True):
                        norm = delta.norm()
                        if norm > max_norm:
                            delta.mul_(max_norm / norm)
    finally:
        for p in needs_grad:
            p.requires_grad_(True)
    return [
        ValueResult(delta.detach(), start, step, nll_value)
        for delta, start in zip(deltas, initial, strict=True)
    ]


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
