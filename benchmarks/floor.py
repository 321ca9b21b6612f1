"""Each editing method against its floor, edit by edit at one thread; prints JSON.

The floor of an edit is the same edit written here in plain torch for the GPT-2 family that
computes only what the edit's result depends on: the same prompts, context prefixes, settings
and stopping rule, and every activation that no delta or trained weight reaches computed once
(the context before the edited token, the blocks below the edited layer and the edited block up
to its site; the context prefixes' own keys and values once per model, as they do not depend
on the edit), logits only where a loss reads them, each update applied once. The floor checks
itself: it must take the same value steps (FT: training steps) as kedit and edit the weights
alike (the largest absolute difference is reported).

For each method, `--n` edits of the bundled benchmark run one by one, each made by kedit and by
the floor back to back from the unedited model (which one goes first alternates); the medians
and their ratio are reported, in wall time and in the thread's CPU time (on a shared machine
the CPU time is the steadier: it leaves out the time other processes held the core). `--ops`
also counts torch operations (aten calls, forward and backward) per value step and per edit,
from edits with fixed steps (a stopping threshold no edit reaches) of S and 2S steps: per
step = the difference / S, fixed = the rest. `--old SRC` times another kedit source tree
(e.g. `git archive` of an older commit, unpacked) in subprocesses that alternate with this
tree's, `--rounds` each, so that the machine's drift falls on both alike.

Statistics, context prefixes and the floor's per-model work are prepared by an untimed warm-up
edit of each kind first (kedit caches them per model too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

METHODS = ["rome", "r-rome", "emmet", "memit", "alphaedit", "pmet", "ft-m", "ft-l"]
ESSENCE = "{} is a"


# --- GPT-2, written out ----------------------------------------------------------------------


class Gpt2:
    """A copy of a GPT-2 LM's weights as plain tensors, and its math."""

    def __init__(self, model: torch.nn.Module) -> None:
        config, base = model.config, model.transformer
        self.wte, self.wpe = base.wte.weight.detach().clone(), base.wpe.weight.detach().clone()
        self.ln_f = (base.ln_f.weight.detach().clone(), base.ln_f.bias.detach().clone())
        self.eps, self.heads, self.width = config.layer_norm_epsilon, config.n_head, config.n_embd
        self.scale = (self.width // self.heads) ** -0.5
        self.blocks = []
        for block in base.h:
            parts = {
                "ln1": block.ln_1,
                "qkv": block.attn.c_attn,
                "proj": block.attn.c_proj,
                "ln2": block.ln_2,
                "fc": block.mlp.c_fc,
                "out": block.mlp.c_proj,
            }
            self.blocks.append(
                {
                    name: (m.weight.detach().clone(), m.bias.detach().clone())
                    for name, m in parts.items()
                }
            )

    @staticmethod
    def conv(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w, b = wb
        return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])

    def norm(self, x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (self.width,), wb[0], wb[1], self.eps)

    @staticmethod
    def gelu(x: torch.Tensor) -> torch.Tensor:
        """GPT-2's `gelu_new`, as its modelling code writes it."""
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte[ids] + self.wpe[positions]

    def qkv(self, p: dict, h: torch.Tensor) -> list[torch.Tensor]:
        """Queries, keys and values of block `p` for inputs `h`, (rows, heads, seq, head dim)."""
        shape = (*h.shape[:2], self.heads, -1)
        parts = self.conv(self.norm(h, p["ln1"]), p["qkv"]).split(self.width, dim=2)
        return [t.view(shape).transpose(1, 2) for t in parts]

    def attend(self, p: dict, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.conv(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.width), p["proj"])

    def mlp_keys(self, p: dict, mid: torch.Tensor) -> torch.Tensor:
        """Inputs of the MLP output projection (ROME's keys) at mid-block states `mid`."""
        return self.gelu(self.conv(self.norm(mid, p["ln2"]), p["fc"]))

    def block(self, p: dict, h: torch.Tensor, past, mask: torch.Tensor) -> dict[str, Any]:
        """Block `p` on the new positions `h` after the cached keys and values `past`."""
        q, k, v = self.qkv(p, h)
        keys = k if past is None else torch.cat([past[0], k], 2)
        values = v if past is None else torch.cat([past[1], v], 2)
        attn = self.attend(p, q, keys, values, mask)
        mid = attn + h
        a = self.mlp_keys(p, mid)
        mlp = self.conv(a, p["out"])
        return {
            "in": h,
            "attn": attn,
            "mid": mid,
            "a": a,
            "mlp": mlp,
            "out": mid + mlp,
            "k": k,
            "v": v,
        }

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h, self.ln_f) @ self.wte.T


def attention_mask(valid: torch.Tensor, n_new: int) -> torch.Tensor:
    """(rows, 1, n_new, keys): the last `n_new` keys are the queries; each sees the valid keys up
    to itself, and itself (a padding query's output is never read; this keeps it finite)."""
    n_keys = valid.shape[1]
    j, i = torch.arange(n_keys), torch.arange(n_keys - n_new, n_keys)
    return (((j <= i[:, None]) & valid[:, None, :]) | (j == i[:, None]))[:, None]


def left_pad(tensors: list[torch.Tensor], width: int, dim: int) -> torch.Tensor:
    return torch.stack(
        [F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (width - t.shape[dim], 0)) for t in tensors]
    )


# --- per model: the context prefixes --------------------------------------------------------


class Prefixes:
    """Each context prefix's tokens and, at every block, their keys, values, mid-block states and
    MLP keys, stacked left-padded; computed once per model."""

    def __init__(self, net: Gpt2, lm, texts: list[str]) -> None:
        self.texts = texts
        self.ids = [lm.encode_prompt(text) for text in texts]
        self.width = max(len(ids) for ids in self.ids)
        per_prefix = []
        with torch.no_grad():
            for ids in self.ids:
                if not ids:  # GPT-2 puts no start token before a text
                    heads, inner = net.heads, net.blocks[0]["fc"][0].shape[1]
                    empty = [
                        torch.zeros(heads, 0, net.width // heads),
                        torch.zeros(heads, 0, net.width // heads),
                        torch.zeros(0, net.width),
                        torch.zeros(0, inner),
                    ]
                    per_prefix.append([empty] * len(net.blocks))
                    continue
                h = net.embed(torch.tensor(ids), torch.arange(len(ids)))[None]
                mask = attention_mask(torch.ones(1, len(ids), dtype=torch.bool), len(ids))
                layers = []
                for p in net.blocks:
                    out = net.block(p, h, None, mask)
                    layers.append([out["k"][0], out["v"][0], out["mid"][0], out["a"][0]])
                    h = out["out"]
                per_prefix.append(layers)
        self.blocks = [
            [
                left_pad(
                    [layers[b][part] for layers in per_prefix], self.width, 1 if part < 2 else 0
                )
                for part in range(4)
            ]
            for b in range(len(net.blocks))
        ]


# --- one request's rows, as the value optimisation reads them -------------------------------


def encode_batch(lm, texts: list[str]) -> list[list[int]]:
    return [
        lm.start_ids + ids for ids in lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]


@dataclass
class Rows:
    """A request's rows (prompt + target after each prefix; then its essence prompt), each cut at
    the edited token into a context (the part shared with its prefix's cached tokens, then the
    rest, left-padded) and a suffix (right-padded; the edited token first)."""

    prefix_of: torch.Tensor  # index of each row's prefix
    shared_valid: torch.Tensor  # (rows, prefix width): the cached prefix positions it keeps
    rest_ids: torch.Tensor
    rest_valid: torch.Tensor
    rest_pos: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_valid: torch.Tensor
    suffix_pos: torch.Tensor
    target_ids: torch.Tensor  # (prompt rows, target length)
    target_at: torch.Tensor  # suffix position predicting each target token
    n_prompts: int

    @property
    def context_valid(self) -> torch.Tensor:
        return torch.cat([self.shared_valid, self.rest_valid], 1)


def build_rows(lm, prefixes: Prefixes, request, fact_token: str) -> Rows:
    text, subject = request.text, request.subject
    target = lm.encode(request.target_new)
    essence = ESSENCE.replace("{}", subject)
    texts = [(prefix, text) for prefix in prefixes.texts] + [("", essence)]
    ends = [len(t) if fact_token == "last" else t.find(subject) + len(subject) for _, t in texts]
    prompts = encode_batch(lm, [p + t for p, t in texts])
    cut_texts = [p + t[:e] for (p, t), e in zip(texts, ends, strict=True)]
    cuts = [len(ids) - 1 for ids in encode_batch(lm, cut_texts)]
    n, n_prompts = len(texts), len(prefixes.texts)
    rows = [ids + target[:-1] for ids in prompts[:n_prompts]] + prompts[n_prompts:]
    prefix_of = list(range(n_prompts)) + [0]
    shared = []
    for row, cut, index in zip(rows, cuts, prefix_of, strict=True):
        cached, common = prefixes.ids[index], 0
        while common < min(len(cached), cut) and cached[common] == row[common]:
            common += 1
        shared.append(common)
    width, rest = prefixes.width, max(c - s for c, s in zip(cuts, shared, strict=True))
    suffix = max(len(r) - c for r, c in zip(rows, cuts, strict=True))
    shared_valid = torch.zeros(n, width, dtype=torch.bool)
    rest_ids = torch.zeros(n, rest, dtype=torch.long)
    rest_valid = torch.zeros(n, rest, dtype=torch.bool)
    rest_pos = torch.zeros(n, rest, dtype=torch.long)
    suffix_ids = torch.zeros(n, suffix, dtype=torch.long)
    suffix_valid = torch.zeros(n, suffix, dtype=torch.bool)
    for i, (row, cut, common, index) in enumerate(zip(rows, cuts, shared, prefix_of, strict=True)):
        start = width - len(prefixes.ids[index])
        shared_valid[i, start : start + common] = True
        rest_ids[i, rest - (cut - common) :] = torch.tensor(row[common:cut], dtype=torch.long)
        rest_valid[i, rest - (cut - common) :] = True
        rest_pos[i, rest - (cut - common) :] = torch.arange(common, cut)
        suffix_ids[i, : len(row) - cut] = torch.tensor(row[cut:])
        suffix_valid[i, : len(row) - cut] = True
    firsts = torch.tensor(
        [len(p) - 1 - c for p, c in zip(prompts[:n_prompts], cuts[:n_prompts], strict=True)]
    )
    return Rows(
        prefix_of=torch.tensor(prefix_of),
        shared_valid=shared_valid,
        rest_ids=rest_ids,
        rest_valid=rest_valid,
        rest_pos=rest_pos,
        suffix_ids=suffix_ids,
        suffix_valid=suffix_valid,
        suffix_pos=torch.tensor(cuts)[:, None] + torch.arange(suffix),
        target_ids=torch.tensor([target] * n_prompts),
        target_at=(firsts[:, None] + torch.arange(len(target))).clamp(max=suffix - 1),
        n_prompts=n_prompts,
    )


@dataclass
class Unedited:
    """What the edit reads from the unedited model, computed once per edit: per block, the
    context's keys and values, and the context's and suffix's mid-block states and MLP keys;
    the edited block's output and attention output on the suffix."""

    context: list[list[torch.Tensor]]  # per block: keys, values, mid states, MLP keys
    suffix: list[dict[str, torch.Tensor]]  # per block up to the edited one: mid, a
    top: dict[str, torch.Tensor]  # the edited block: out, attn, mid, a at the suffix


def run_unedited(net: Gpt2, prefixes: Prefixes, rows: Rows, layer: int) -> Unedited:
    """The rest of each context through every block (its keys and values are needed by every
    block; the last one needs nothing else), after its cached prefix; then the suffix through
    blocks 0..layer."""
    last = len(net.blocks) - 1
    index, _shared_valid = rows.prefix_of, rows.shared_valid
    context, suffix = [], []
    with torch.no_grad():
        h = net.embed(rows.rest_ids, rows.rest_pos)
        mask = attention_mask(rows.context_valid, rows.rest_ids.shape[1])
        for b, p in enumerate(net.blocks):
            pk, pv, pmid, pa = (t[index] for t in prefixes.blocks[b])
            if b == last:
                _, k, v = net.qkv(p, h)
                context.append([torch.cat([pk, k], 2), torch.cat([pv, v], 2), None, None])
                break
            out = net.block(p, h, (pk, pv), mask)
            context.append(
                [
                    torch.cat([pk, out["k"]], 2),
                    torch.cat([pv, out["v"]], 2),
                    torch.cat([pmid, out["mid"]], 1),
                    torch.cat([pa, out["a"]], 1),
                ]
            )
            h = out["out"]
        h = net.embed(rows.suffix_ids, rows.suffix_pos)
        mask = attention_mask(torch.cat([rows.context_valid, rows.suffix_valid], 1), h.shape[1])
        for b in range(layer + 1):
            out = net.block(net.blocks[b], h, context[b][:2], mask)
            suffix.append(out)
            h = out["out"]
    return Unedited(context, suffix, out)


def value_search(
    net: Gpt2, rows: Rows, before: Unedited, hp, layer: int, sites: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """ROME Eq. 4 for one request: deltas at the edited token of block `layer` ('mlp': its MLP
    output, 'block': its output, both adding to the block's output; 'attn+mlp': PMET's pair)
    with the stopping rule; returns the deltas, the sites' unedited outputs, the steps."""
    assert hp.v_stop == "nll" and hp.v_patience == 0, "the floor has kedit's default stop rule"
    top, n = before.top, len(rows.prefix_of)
    first = torch.zeros(n, dtype=torch.long)
    rows_at = (torch.arange(n), first)
    if sites == "attn+mlp":
        starts = [top["attn"][0, 0], top["mlp"][0, 0]]
        x_at = top["in"][:, 0]
    elif sites == "mlp":
        starts = [top["mlp"][0, 0]]
    else:
        starts = [top["out"][0, 0]]
    deltas = [torch.zeros(1, net.width, requires_grad=True) for _ in starts]
    optimizer = torch.optim.Adam(deltas, lr=hp.v_lr)
    max_norms = [hp.clamp_norm_factor * s.norm() for s in starts]
    start_norms2 = [s.norm() ** 2 for s in starts]
    context_valid = rows.context_valid
    mask = attention_mask(
        torch.cat([context_valid, rows.suffix_valid], 1), rows.suffix_ids.shape[1]
    )
    p_top = rows.n_prompts
    n_targets = rows.target_ids.shape[1]
    read_rows = torch.cat([torch.arange(p_top).repeat_interleave(n_targets), torch.tensor([n - 1])])
    read_at = torch.cat([rows.target_at.flatten(), torch.tensor([0])])
    reference = None
    for step in range(hp.v_steps + 1):
        if sites == "attn+mlp":
            p = net.blocks[layer]
            mid = (top["attn"][:, 0] + deltas[0]) + x_at
            out = mid + (net.conv(net.mlp_keys(p, mid), p["out"]) + deltas[1])
            h = top["out"].index_put(rows_at, out)
        else:
            h = top["out"].index_put(rows_at, deltas[0].expand(n, -1), accumulate=True)
        for b in range(layer + 1, len(net.blocks)):
            h = net.block(net.blocks[b], h, before.context[b][:2], mask)["out"]
        logp = torch.log_softmax(net.logits(h[read_rows, read_at]), dim=-1)
        token = logp[:-1].gather(1, rows.target_ids.view(-1, 1)).view(p_top, n_targets)
        nll_rows = -token.sum(1) / n_targets
        essence = logp[-1]
        if reference is None:
            reference = essence.detach()
        if step == hp.v_steps or float(nll_rows.detach().max()) < hp.v_stop_nll:
            break
        kl = (essence.exp() * (essence - reference)).sum()
        decay = sum(
            (d.norm() ** 2 / s2 if hp.v_weight_decay_form == "squared" else d.norm() / s2)
            for d, s2 in zip(deltas, start_norms2, strict=True)
        )
        loss = nll_rows.mean() + hp.kl_factor * kl + hp.v_weight_decay * decay
        optimizer.zero_grad()
        loss.backward()
        with torch.no_grad():
            if step == 0 and hp.v_first_step > 0:
                for d, s in zip(deltas, starts, strict=True):
                    d.sub_(hp.v_first_step * s.norm() * (d.grad.sign() / net.width**0.5))
            else:
                optimizer.step()
            for d, m in zip(deltas, max_norms, strict=True):
                d.mul_((m / d.norm().clamp(min=1e-12)).clamp(max=1.0))
    return [d.detach()[0] for d in deltas], starts, step


# --- the methods' updates --------------------------------------------------------------------


def _add(weight: torch.Tensor, right: torch.Tensor, left: torch.Tensor) -> None:
    """W += the (in × out) GPT-2 update of `left` (out × n) @ `right` (n × in)."""
    weight.add_(right.T.float() @ left.T.float())


def floor_rank_one(net, lm, prefixes, request, hp, corrected: bool) -> int:
    from kedit.methods._locate import inverse_second_moment

    layer = hp.layers[0]
    rows = build_rows(lm, prefixes, request, hp.fact_token)
    before = run_unedited(net, prefixes, rows, layer)
    (delta,), _, steps = value_search(net, rows, before, hp, layer, "mlp")
    keys = before.top["a"][: rows.n_prompts, 0]
    k_star = keys.mean(0).double()
    direction = k_star if not hp.mom2_adjustment else inverse_second_moment(lm, hp, layer) @ k_star
    key = k_star if corrected else keys[0].double()
    right = direction / (direction @ key)
    _add(net.blocks[layer]["out"][0], right[None], delta.double()[:, None])
    return steps


def floor_emmet(net, lm, prefixes, request, hp) -> int:
    from kedit.methods._locate import inverse_second_moment

    layer = hp.layers[0]
    rows = build_rows(lm, prefixes, request, hp.fact_token)
    before = run_unedited(net, prefixes, rows, layer)
    (delta,), _, steps = value_search(net, rows, before, hp, layer, "mlp")
    keys = before.top["a"][: rows.n_prompts, 0].mean(0).double()[None]
    weighted = keys @ inverse_second_moment(lm, hp, layer)
    system = weighted @ keys.T
    system = system + hp.ridge * system.diagonal().mean() * torch.eye(1, dtype=torch.float64)
    right = torch.linalg.solve(system, weighted)
    _add(net.blocks[layer]["out"][0], right, delta.double()[:, None])
    return steps


def _recompute(
    net, rows: Rows, before: Unedited, lower: int, upper: int
) -> dict[str, torch.Tensor]:
    """After block `lower`'s MLP output projection changed (and no block between it and
    `upper`), block `upper` at the edited token of the prompt rows: its MLP keys, its MLP
    output and its output (the context and the edited token; `upper` = `lower` + 1)."""
    assert upper == lower + 1
    m = rows.n_prompts
    ctx = before.context[lower]
    mid = torch.cat([ctx[2][:m], before.suffix[lower]["mid"][:m, :1]], 1)
    a = torch.cat([ctx[3][:m], before.suffix[lower]["a"][:m, :1]], 1)
    h = mid + net.conv(a, net.blocks[lower]["out"])
    p = net.blocks[upper]
    q, k, v = net.qkv(p, h)
    valid = torch.cat([rows.context_valid[:m], torch.ones(m, 1, dtype=torch.bool)], 1)
    mid_at = net.attend(p, q[:, :, -1:], k, v, attention_mask(valid, 1)) + h[:, -1:]
    a_at = net.mlp_keys(p, mid_at)[:, 0]
    mlp_at = net.conv(a_at, p["out"])
    return {"a": a_at, "mlp": mlp_at, "out": mid_at[:, 0] + mlp_at}


def floor_spread(net, lm, prefixes, request, hp, method: str) -> int:
    """MEMIT, AlphaEdit and PMET on consecutive layers: targets at the top layer, then each
    layer's share of what is missing there, lowest first (MEMIT Alg. 1)."""
    from kedit.methods._locate import second_moment_cholesky

    layers = sorted(hp.layers)
    top = layers[-1]
    rows = build_rows(lm, prefixes, request, hp.fact_token)
    before = run_unedited(net, prefixes, rows, top)
    sites = "attn+mlp" if method == "pmet" else "block"
    deltas, starts, steps = value_search(net, rows, before, hp, top, sites)
    target = starts[-1].double() + deltas[-1].double()
    m = rows.n_prompts
    keys = before.suffix[layers[0]]["a"][:m, 0]
    current = starts[-1]
    if method == "alphaedit":
        from kedit.methods.alphaedit import null_space_projection
    with torch.no_grad():
        for index, layer in enumerate(layers):
            if index:
                seen = _recompute(net, rows, before, layers[index - 1], layer)
                keys, current = seen["a"], seen["mlp" if method == "pmet" else "out"][0]
            left = ((target - current.double()) / _divisor(method, len(layers) - index))[None]
            k = keys.mean(0).double()[None]
            if method == "alphaedit":
                projected = k @ null_space_projection(lm, hp, layer)
                gram = projected @ k.T
                gram.diagonal().add_(hp.ridge)
                right = torch.linalg.solve(gram, projected)
            else:
                cholesky = second_moment_cholesky(lm, hp, layer)
                assert cholesky is not None
                spread = torch.cholesky_solve(k.T, cholesky)
                gram = k @ spread
                gram.diagonal().add_(hp.mom2_update_weight)
                right = torch.linalg.solve(gram, spread.T)
            _add(net.blocks[layer]["out"][0], right, left.T)
    return steps


def _divisor(method: str, layers_left: int) -> float:
    return math.sqrt(layers_left) if method == "pmet" else float(layers_left)


def floor_fine_tune(net, lm, request, hp, last_token: bool) -> int:
    """FT-L / FT-M of one request: the trained projection's input and the block's mid state are
    computed once; each step adds the projection to the mid state and runs the blocks above."""
    assert len(hp.layers) == 1 and hp.norm_constraint is None
    layer = hp.layers[0]
    prompt, target = lm.encode_prompt(request.text), lm.encode(request.target_new)
    row = prompt if last_token else prompt + target[:-1]
    read = [len(prompt) - 1] * len(target) if last_token else list(range(len(prompt) - 1, len(row)))
    h = net.embed(torch.tensor(row), torch.arange(len(row)))[None]
    mask = attention_mask(torch.ones(1, len(row), dtype=torch.bool), len(row))
    with torch.no_grad():
        for b in range(layer):
            h = net.block(net.blocks[b], h, None, mask)["out"]
        seen = net.block(net.blocks[layer], h, None, mask)
    mid, a = seen["mid"], seen["a"]
    weight, bias = net.blocks[layer]["out"]
    trained = weight.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([trained], lr=hp.lr, weight_decay=hp.weight_decay)
    read, target = torch.tensor(read), torch.tensor(target)
    for step in range(hp.steps + 1):
        h = mid + net.conv(a, (trained, bias))
        for b in range(layer + 1, len(net.blocks)):
            h = net.block(net.blocks[b], h, None, mask)["out"]
        logp = torch.log_softmax(net.logits(h[0, read]), dim=-1)
        nll = -logp.gather(1, target[:, None]).sum() / len(target)
        if step == hp.steps or float(nll.detach()) < hp.stop_nll:
            break
        optimizer.zero_grad()
        nll.backward()
        optimizer.step()
    with torch.no_grad():
        weight.copy_(trained)
    return step


# --- kedit against the floor ------------------------------------------------------------------


class Floor:
    """The floor of one method on one model: per-model work done at construction."""

    def __init__(self, lm, method: str, overrides: dict[str, Any]) -> None:
        from kedit.methods._locate import context_prefixes
        from kedit.methods.registry import resolve_hparams

        self.lm, self.method = lm, method
        self.hp = resolve_hparams(method, lm, overrides)
        self.net = Gpt2(lm.model)
        self.prefixes = None
        if not method.startswith("ft"):
            self.prefixes = Prefixes(self.net, lm, context_prefixes(lm, self.hp))

    def edit(self, request) -> int:
        """Edit the floor's copy of the weights in place; the steps taken."""
        net, lm, hp, m = self.net, self.lm, self.hp, self.method
        if m in ("rome", "r-rome"):
            return floor_rank_one(net, lm, self.prefixes, request, hp, m == "r-rome")
        if m == "emmet":
            return floor_emmet(net, lm, self.prefixes, request, hp)
        if m in ("memit", "alphaedit", "pmet"):
            return floor_spread(net, lm, self.prefixes, request, hp, m)
        return floor_fine_tune(net, lm, request, hp, last_token=m == "ft-l")

    def params(self) -> list[str]:
        return [f"{self.lm.layout.mlp_out_name(layer)}.weight" for layer in sorted(self.hp.layers)]

    def weights(self) -> dict[str, torch.Tensor]:
        """The edited projections' weights in the floor's copy, by the model's names."""
        layers = sorted(self.hp.layers)
        return {
            name: self.net.blocks[layer]["out"][0].clone()
            for name, layer in zip(self.params(), layers, strict=True)
        }

    def reset(self, originals: dict[str, torch.Tensor]) -> None:
        """Put the unedited weights back into the floor's copy."""
        with torch.no_grad():
            for name, layer in zip(self.params(), sorted(self.hp.layers), strict=True):
                self.net.blocks[layer]["out"][0].copy_(originals[name])


def kedit_steps(edit) -> int:
    info = edit.info
    return info["value_steps"][0] if "value_steps" in info else info["steps"]


def compare_one(lm, floor: Floor, request, overrides: dict[str, Any], kedit_first: bool) -> dict:
    """One edit by kedit and by the floor, each from the unedited model: their wall and thread
    CPU seconds, their steps, and how far apart their edited weights are."""
    import kedit

    model = lm.model
    names = floor.params()
    originals = {n: model.get_parameter(n).detach().clone() for n in names}
    out: dict[str, Any] = {}

    def timed(who: str, run) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        result = run()
        out[f"{who}_cpu_s"] = time.thread_time() - cpu
        out[f"{who}_s"] = time.perf_counter() - wall
        return result

    def by_kedit() -> None:
        edit = timed(
            "kedit", lambda: kedit.edit(lm, request, method=floor.method, hparams=overrides)
        )
        out["kedit_steps"] = kedit_steps(edit)
        out["kedit_w"] = {n: model.get_parameter(n).detach().clone() for n in names}
        edit.undo()

    def by_floor() -> None:
        out["floor_steps"] = timed("floor", lambda: floor.edit(request))
        out["floor_w"] = floor.weights()
        floor.reset(originals)

    for run in (by_kedit, by_floor) if kedit_first else (by_floor, by_kedit):
        run()
    by_kedit_w, by_floor_w = out.pop("kedit_w"), out.pop("floor_w")
    diffs = {n: by_kedit_w[n] - by_floor_w[n] for n in names}
    changes = {n: by_floor_w[n] - originals[n] for n in names}
    out["weight_diff"] = max(float(d.abs().max()) for d in diffs.values())
    out["weight_change"] = max(float(c.abs().max()) for c in changes.values())
    out["relative_weight_diff"] = max(float(diffs[n].norm() / changes[n].norm()) for n in names)
    return out


class CountOps(TorchDispatchMode):
    """Counts aten calls (forward and backward) by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def op_counts(lm, method: str, request, overrides: dict[str, Any], steps: int) -> dict[str, Any]:
    """Ops per value step and per edit of kedit and of the floor, from fixed-step edits."""
    import kedit

    ft = method.startswith("ft")
    fixed = {"stop_nll": -1.0} if ft else {"v_stop_nll": -1.0}
    counts: dict[str, list[int]] = {"kedit": [], "floor": []}
    for s in (steps, 2 * steps):
        settings = {**overrides, **fixed, ("steps" if ft else "v_steps"): s}
        floor = Floor(lm, method, settings)
        with CountOps() as ops:
            edit = kedit.edit(lm, request, method=method, hparams=settings)
        edit.undo()
        counts["kedit"].append(sum(ops.counts.values()))
        originals = floor.weights()
        with CountOps() as ops:
            floor.edit(request)
        counts["floor"].append(sum(ops.counts.values()))
        floor.reset(originals)
    out = {}
    for who, (one, two) in counts.items():
        per_step = (two - one) / steps
        out[who] = {"per_step": per_step, "fixed": one - steps * per_step}
    out["ratio_per_step"] = out["kedit"]["per_step"] / out["floor"]["per_step"]
    return out


def measure(model: str, methods: list[str], n: int, overrides: dict[str, Any], ops: bool) -> dict:
    import kedit
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    torch.set_num_threads(1)
    lm = kedit.load(model)
    requests = load_requests(benchmark_path("knowedit"), n=n + 1)
    results = []
    for method in methods:
        kedit.edit(lm, requests[0], method=method, hparams=overrides).undo()
        floor = Floor(lm, method, overrides)
        compare_one(lm, floor, requests[0], overrides, True)
        rows = [
            compare_one(lm, floor, request, overrides, index % 2 == 0)
            for index, request in enumerate(requests[1:])
        ]
        result: dict[str, Any] = {"method": method, "edits": n}
        for clock in ("s", "cpu_s"):
            kedit_t = statistics.median(r[f"kedit_{clock}"] for r in rows)
            floor_t = statistics.median(r[f"floor_{clock}"] for r in rows)
            result[f"kedit_median_{clock}"], result[f"floor_median_{clock}"] = kedit_t, floor_t
            result["ratio" if clock == "s" else "ratio_cpu"] = kedit_t / floor_t
        result.update(
            {
                "median_steps": statistics.median(r["kedit_steps"] for r in rows),
                "same_steps": sum(r["kedit_steps"] == r["floor_steps"] for r in rows),
                "steps_kedit_floor": [
                    [r["kedit_steps"], r["floor_steps"]]
                    for r in rows
                    if r["kedit_steps"] != r["floor_steps"]
                ],
                "max_weight_diff": max(r["weight_diff"] for r in rows),
                "max_weight_change": max(r["weight_change"] for r in rows),
                "max_relative_weight_diff": max(r["relative_weight_diff"] for r in rows),
            }
        )
        if ops:
            result["ops"] = op_counts(lm, method, requests[1], overrides, 5)
        results.append(result)
    return {"model": model, "threads": torch.get_num_threads(), "results": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--n", type=int, default=30, help="timed edits per method")
    parser.add_argument("--hparams", type=json.loads, default={}, help="JSON overrides")
    parser.add_argument("--ops", action="store_true", help="also count ops per step and edit")
    parser.add_argument("--old", help="another kedit source tree to time alike (its src folder)")
    parser.add_argument("--rounds", type=int, default=1, help="subprocess rounds per tree")
    args = parser.parse_args(argv)
    if args.old is None:
        report = measure(args.model, args.methods, args.n, args.hparams, args.ops)
        print(json.dumps(report, indent=2))
        return report
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(_own_src())}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, src in trees.items():
            command = [sys.executable, __file__, "--model", args.model, "--n", str(args.n)]
            command += ["--methods", *args.methods, "--hparams", json.dumps(args.hparams)]
            command += ["--ops"] if args.ops else []
            env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                raise SystemExit(done.stderr)
            runs[name].append(json.loads(done.stdout))
    report = {"model": args.model, "rounds": args.rounds, "trees": trees, "runs": runs}
    report["summary"] = {
        name: {
            method: {
                key: statistics.median(
                    r[key] for run in rs for r in run["results"] if r["method"] == method
                )
                for key in ("ratio", "ratio_cpu", "kedit_median_cpu_s", "floor_median_cpu_s")
            }
            for method in args.methods
        }
        for name, rs in runs.items()
    }
    print(json.dumps(report, indent=2))
    return report


def _own_src() -> str:
    import kedit

    return os.path.dirname(os.path.dirname(kedit.__file__))


if __name__ == "__main__":
    main()
