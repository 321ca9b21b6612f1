"""Knowledge circuits: edge attribution patching on the native model's computation graph.

Each prompt comes with a corrupted twin: the same template with another subject of the same
token count whose answer starts with another token. With m the metric of a run (the logit
difference between the clean and the corrupted answer at the last token, or the clean
answer's log-probability), an edge u → v is scored by how much m would change if v read u's
corrupted output instead of its clean one, to first order (Syed et al., 2023, EAP):

    score(u → v) = Σ_{prompts, positions} (a_u(corrupted) − a_u(clean)) · ∂m/∂x_v

EAP-IG (Hanna et al., 2024) averages the gradient over `steps` runs whose input embeddings
move from the corrupted to the clean ones, x = x_c + (k/steps)(x_clean − x_c), k = 0..steps−1.

A circuit keeps some edges (the top n by |score|, those above a threshold, or greedily from the
logits up) and drops edges that no longer connect the input to the logits. It is measured by
running the model with every edge outside the circuit carrying the corrupted value, each m
averaged over prompts. Faithfulness is normalised between the corrupted run (no edge kept, 0)
and the full model (1), as in Hanna et al. (2024) and the Knowledge Circuits experiments:

    faithfulness = (m(circuit) − m(corrupted)) / (m(full model) − m(corrupted))

and `metric_kept` = m(circuit) / m(full model) is the share of the full model's metric kept.
"""

from __future__ import annotations

import heapq
import random
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import nan
from pathlib import Path
from typing import Any

import torch

from kedit.analysis._common import (
    Result,
    TokenizedFact,
    as_facts,
    new_figure,
    rounded,
    save_figure,
    tokenize_facts,
)
from kedit.analysis.graph import CircuitGraph, GraphRun, build_graph
from kedit.lm import LM

METHODS = ("eap", "eap-ig")
METRICS = ("logit_diff", "logprob")
SELECTIONS = ("top", "threshold", "greedy")
HIT_AT = 10


@dataclass(frozen=True)
class ContrastPair:
    """A prompt and its corrupted twin (same token count), with both answers' first tokens."""

    clean: TokenizedFact
    corrupted: TokenizedFact


def contrast_pairs(lm: LM, facts: Sequence[Any], seed: int = 0) -> list[ContrastPair]:
    """Pair each fact with another of the same template and prompt length whose answer starts
    with another token (chosen with `seed`); facts without such a partner are left out."""
    items = tokenize_facts(lm, as_facts(facts))
    rng = random.Random(seed)
    pairs = []
    for item in items:
        partners = [
            other
            for other in items
            if other.fact.template == item.fact.template
            and len(other.ids) == len(item.ids)
            and other.answer_id != item.answer_id
        ]
        if partners:
            pairs.append(ContrastPair(item, rng.choice(partners)))
    if not pairs:
        raise ValueError(
            "facts: no fact has a partner of the same template and token count with another "
            "answer, so no corrupted prompts can be made"
        )
    return pairs


@dataclass
class _Batch:
    clean: torch.Tensor
    corrupted: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    good: torch.Tensor
    bad: torch.Tensor

    @classmethod
    def of(cls, lm: LM, pairs: Sequence[ContrastPair]) -> _Batch:
        clean, mask = lm.pad([pair.clean.ids for pair in pairs])
        corrupted, _ = lm.pad([pair.corrupted.ids for pair in pairs])
        device = clean.device
        return cls(
            clean=clean,
            corrupted=corrupted,
            mask=mask,
            last=torch.tensor([len(pair.clean.ids) - 1 for pair in pairs], device=device),
            good=torch.tensor([pair.clean.answer_id for pair in pairs], device=device),
            bad=torch.tensor([pair.corrupted.answer_id for pair in pairs], device=device),
        )

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(self.last), device=logits.device)
        return logits[rows, self.last.to(logits.device)].float()

    def metric(self, logits: torch.Tensor, kind: str) -> torch.Tensor:
        """The metric per prompt, from the model's logits."""
        final = self.final_logits(logits)
        rows = torch.arange(len(final), device=final.device)
        if kind == "logprob":
            return torch.log_softmax(final, dim=-1)[rows, self.good.to(final.device)]
        return final[rows, self.good.to(final.device)] - final[rows, self.bad.to(final.device)]

    def hits(self, logits: torch.Tensor, k: int = HIT_AT) -> torch.Tensor:
        """Whether the clean answer is among the top k tokens, per prompt."""
        final = self.final_logits(logits)
        top = final.topk(k, dim=-1).indices
        return (top == self.good.to(top.device)[:, None]).any(dim=-1).float()


def _batches(lm: LM, pairs: Sequence[ContrastPair], batch_size: int) -> list[_Batch]:
    return [_Batch.of(lm, pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]


def _run(lm: LM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@torch.no_grad()
def _recorded(lm: LM, graph: CircuitGraph, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
    """(senders' outputs, logits) of a plain run."""
    with GraphRun(lm, graph) as run:
        logits = _run(lm, ids, mask)
        senders = run.senders().detach()
    return senders, logits


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def attribute(
    lm: LM,
    pairs: Sequence[ContrastPair],
    method: str = "eap-ig",
    steps: int = 5,
    metric: str = "logit_diff",
    batch_size: int = 32,
) -> torch.Tensor:
    """Edge scores (senders × receivers; 0 where there is no edge) by EAP or EAP-IG with
    `steps` integration steps, averaged over the pairs."""
    _check_choice("method", method, METHODS)
    _check_choice("metric", metric, METRICS)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    graph = build_graph(lm)
    scores = torch.zeros(len(graph.senders), len(graph.receivers))
    for batch in _batches(lm, pairs, batch_size):
        corrupted, _ = _recorded(lm, graph, batch.corrupted, batch.mask)
        clean, _ = _recorded(lm, graph, batch.clean, batch.mask)
        runs = [None] if method == "eap" else range(steps)
        gradient = torch.zeros(len(graph.receivers), *clean.shape[1:], device=clean.device)
        for step in runs:
            inputs = None
            if step is not None:
                inputs = corrupted[0] + (step / steps) * (clean[0] - corrupted[0])
            offsets = torch.zeros_like(gradient, dtype=clean.dtype, requires_grad=True)
            with torch.enable_grad(), GraphRun(lm, graph, offsets=offsets, inputs=inputs):
                value = batch.metric(_run(lm, batch.clean, batch.mask), metric).sum()
                (grad,) = torch.autograd.grad(value, offsets)
            gradient += grad.float()
        gradient /= len(runs)
        difference = (corrupted - clean).float()
        scores += torch.einsum("ubsd,rbsd->ur", difference, gradient).cpu()
    return scores.masked_fill(~graph.real, 0.0) / len(pairs)


def prune(graph: CircuitGraph, edges: torch.Tensor) -> torch.Tensor:
    """The edges left once nodes without an incoming or an outgoing edge are removed, and
    the edges of removed nodes with them, until nothing changes (the input node counts as
    having incoming edges; the logits are always there)."""
    edges = edges.clone()
    inputs_of = graph.node_receivers().float()
    while True:
        outgoing = edges.any(dim=1)
        incoming = (inputs_of @ edges.any(dim=0).float()) > 0
        incoming[0] = True
        nodes = outgoing & incoming
        receivers_alive = (nodes.float() @ inputs_of) > 0
        receivers_alive[graph.logits_receiver] = True
        kept = edges & nodes[:, None] & receivers_alive[None, :]
        if torch.equal(kept, edges):
            return kept
        edges = kept


def select_top(graph: CircuitGraph, scores: torch.Tensor, n: int) -> torch.Tensor:
    """The n edges of largest |score|."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= graph.n_edges:
        raise ValueError(f"edges: expected 0..{graph.n_edges} edges, got {n!r}")
    flat = scores.abs().masked_fill(~graph.real, -1.0).flatten()
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.argsort(descending=True, stable=True)[:n]] = True
    return chosen.view_as(scores) & graph.real


def select_threshold(graph: CircuitGraph, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The edges whose |score| is at least `threshold`."""
    if not isinstance(threshold, int | float) or threshold < 0:
        raise ValueError(f"threshold: expected a number >= 0, got {threshold!r}")
    return (scores.abs() >= threshold) & graph.real


def select_greedy(graph: CircuitGraph, scores: torch.Tensor, n: int) -> torch.Tensor:
    """n edges chosen from the logits up: each step takes the edge of largest |score| among
    those that enter a node already in the circuit (its sender joins the circuit)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= graph.n_edges:
        raise ValueError(f"edges: expected 0..{graph.n_edges} edges, got {n!r}")
    magnitude = scores.abs()
    receivers_of = graph.node_receivers()
    chosen = torch.zeros_like(graph.real)
    heap: list[tuple[float, int, int]] = []

    def offer(receivers: list[int]) -> None:
        for receiver in receivers:
            for sender in range(graph.upstream[receiver]):
                heapq.heappush(heap, (-float(magnitude[sender, receiver]), sender, receiver))

    offer([graph.logits_receiver])
    in_circuit = {len(graph.senders)}  # the logits
    while int(chosen.sum()) < n and heap:
        _, sender, receiver = heapq.heappop(heap)
        if chosen[sender, receiver]:
            continue
        chosen[sender, receiver] = True
        if sender not in in_circuit:
            in_circuit.add(sender)
            offer(receivers_of[sender].nonzero().flatten().tolist())
    return chosen


@torch.no_grad()
def evaluate_edges(
    lm: LM, pairs: Sequence[ContrastPair], edges: torch.Tensor, metric: str, batch_size: int = 32
) -> dict[str, float]:
    """Run the model with every edge outside `edges` carrying the corrupted value: the mean
    metric and Hit@10 of the clean answer, against the full model's and (the metric) the
    corrupted run's; the faithfulness between those two and the share of the full metric kept
    (module docstring)."""
    graph = build_graph(lm)
    patch = (graph.real & ~edges).float()
    totals = dict.fromkeys(("metric", "full_metric", "corrupted_metric", "hit", "full_hit"), 0.0)
    for batch in _batches(lm, pairs, batch_size):
        corrupted, corrupted_logits = _recorded(lm, graph, batch.corrupted, batch.mask)
        full = _run(lm, batch.clean, batch.mask)
        with GraphRun(lm, graph, corrupted=corrupted, patch=patch):
            patched = _run(lm, batch.clean, batch.mask)
        totals["metric"] += float(batch.metric(patched, metric).sum())
        totals["full_metric"] += float(batch.metric(full, metric).sum())
        totals["corrupted_metric"] += float(batch.metric(corrupted_logits, metric).sum())
        totals["hit"] += float(batch.hits(patched).sum())
        totals["full_hit"] += float(batch.hits(full).sum())
    means = {key: value / len(pairs) for key, value in totals.items()}
    span = means["full_metric"] - means["corrupted_metric"]
    means["faithfulness"] = (means["metric"] - means["corrupted_metric"]) / span if span else nan
    means["metric_kept"] = means["metric"] / means["full_metric"] if means["full_metric"] else nan
    return means


def _selection(graph: CircuitGraph, scores: torch.Tensor, how: str, size: float) -> torch.Tensor:
    if how == "threshold":
        return select_threshold(graph, scores, size)
    if how == "greedy":
        return select_greedy(graph, scores, int(size))
    return select_top(graph, scores, int(size))


@dataclass
class Circuit(Result):
    """A circuit: the graph, every edge's score, the edges kept (after pruning), how they
    were found and how faithful they are; `curve` holds faithfulness over circuit sizes,
    against random circuits of the same sizes."""

    graph: CircuitGraph
    scores: torch.Tensor
    edges: torch.Tensor
    method: str
    steps: int
    metric: str
    selection: str
    size: float
    n_prompts: int
    evaluation: dict[str, float]
    curve: list[dict[str, Any]] = field(default_factory=list)
    name = "circuit"

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def edge_list(self, edges: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """The kept edges (or those of `edges`), largest |score| first."""
        edges = self.edges if edges is None else edges
        pairs = edges.nonzero().tolist()
        pairs.sort(key=lambda pair: -abs(float(self.scores[pair[0], pair[1]])))
        return [
            {
                "from": self.graph.senders[u],
                "to": self.graph.receivers[r],
                "score": round(float(self.scores[u, r]), 6),
            }
            for u, r in pairs
        ]

    def nodes(self) -> list[str]:
        """The nodes the kept edges touch, in graph order (the logits last)."""
        senders = self.edges.any(dim=1)
        receiving = (self.graph.node_receivers().float() @ self.edges.any(dim=0).float()) > 0
        used = (senders | receiving).tolist()
        names = [name for name, on in zip(self.graph.senders, used, strict=True) if on]
        return [*names, "logits"]

    def node_scores(self) -> dict[str, float]:
        """Each sender's attribution: the sum of |score| over its outgoing edges."""
        totals = self.scores.abs().sum(dim=1)
        return {name: float(value) for name, value in zip(self.graph.senders, totals, strict=True)}

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps if self.method == "eap-ig" else None,
            "metric": self.metric,
            "selection": self.selection,
            "size": self.size,
            "n_prompts": self.n_prompts,
            "graph": {
                "layers": self.graph.n_layers,
                "heads": self.graph.n_heads,
                "key_value_groups": self.graph.n_groups,
                "parallel_blocks": list(self.graph.parallel),
                "edges": self.graph.n_edges,
            },
            "n_edges": self.n_edges,
            "evaluation": self.evaluation,
            "curve": self.curve,
            "nodes": self.nodes(),
            "edges": self.edge_list(),
            "node_scores": {k: round(v, 6) for k, v in self.node_scores().items()},
            "scores": rounded(self.scores, 6),
        }

    def to_dot(self) -> str:
        """The circuit in Graphviz's DOT language: nodes by layer, edges coloured by the sign
        of their score (blue: corrupting the edge lowers the metric, so it carries the answer;
        red: corrupting it raises the metric), width by |score|."""
        largest = max((abs(float(self.scores[u, r])) for u, r in self.edges.nonzero()), default=1)
        lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, style="rounded"];']
        for node in self.nodes():
            shape = "ellipse" if node[0] == "m" else "box"
            lines.append(f'  "{node}" [shape={shape}];')
        for edge in self.edge_list():
            target = edge["to"].split("<")[0]
            kind = edge["to"][len(target) :].strip("<>")
            colour = _colour(edge["score"])
            width = 0.5 + 3 * abs(edge["score"]) / (largest or 1)
            label = f', label="{kind}"' if kind else ""
            for head in self._targets(target):
                lines.append(
                    f'  "{edge["from"]}" -> "{head}" [color="{colour}", '
                    f"penwidth={width:.2f}{label}];"
                )
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _targets(self, receiver_node: str) -> list[str]:
        """The nodes a receiver name stands for (a key/value group: its heads)."""
        if ".g" not in receiver_node:
            return [receiver_node]
        layer, group = receiver_node.split(".g")
        per_group = self.graph.n_heads // self.graph.n_groups
        heads = range(int(group) * per_group, (int(group) + 1) * per_group)
        return [f"{layer}.h{head}" for head in heads]

    def plot(self, path: str | Path | None = None) -> Any:
        """The circuit drawn by Graphviz where its `dot` program is installed (written to
        `path`), otherwise by matplotlib: nodes in rows by layer, edges by score."""
        if path is not None and shutil.which("dot"):
            with tempfile.NamedTemporaryFile("w", suffix=".dot", delete=False) as handle:
                handle.write(self.to_dot())
            subprocess.run(["dot", "-Tpng", handle.name, "-o", str(path)], check=True)
            Path(handle.name).unlink()
            return None
        return save_figure(self._matplotlib_figure(), path)

    def _matplotlib_figure(self) -> Any:
        graph = self.graph
        figure = new_figure(max(6.0, 0.5 * graph.n_heads + 3), 1.2 * graph.n_layers + 2)
        ax = figure.subplots()
        middle = (graph.n_heads - 1) / 2
        where: dict[str, tuple[float, float]] = {"input": (middle, 0.0)}
        for layer in range(graph.n_layers):
            for head in range(graph.n_heads):
                where[f"a{layer}.h{head}"] = (head, 1 + 2 * layer)
            where[f"m{layer}"] = (middle, 2 + 2 * layer)
        where["logits"] = (middle, 1 + 2 * graph.n_layers)
        largest = max((abs(e["score"]) for e in self.edge_list()), default=1.0) or 1.0
        for edge in self.edge_list():
            start = where[edge["from"]]
            for target in self._targets(edge["to"].split("<")[0]):
                end = where[target]
                ax.annotate(
                    "",
                    xy=end,
                    xytext=start,
                    arrowprops={
                        "arrowstyle": "->",
                        "color": _colour(edge["score"]),
                        "lw": 0.4 + 2.5 * abs(edge["score"]) / largest,
                        "alpha": 0.7,
                    },
                )
        used = set(self.nodes())
        for name, (x, y) in where.items():
            ax.text(
                x,
                y,
                name,
                ha="center",
                va="center",
                fontsize=7,
                alpha=1.0 if name in used else 0.25,
                bbox={"boxstyle": "round", "fc": "white", "ec": "grey" if name in used else "none"},
            )
        ax.set_xlim(-1, graph.n_heads + 0.5)
        ax.set_ylim(-1, 2 + 2 * graph.n_layers)
        ax.axis("off")
        faithfulness = self.evaluation.get("faithfulness", float("nan"))
        ax.set_title(
            f"{self.method} circuit: {self.n_edges} of {graph.n_edges} edges, "
            f"faithfulness {faithfulness:.2f}"
        )
        return figure

    def plot_curve(self, path: str | Path | None = None) -> Any:
        """Faithfulness over circuit sizes, with random circuits of the same sizes."""
        figure = new_figure(5.0, 3.5)
        ax = figure.subplots()
        sizes = [point["edges"] for point in self.curve]
        ax.plot(sizes, [p["faithfulness"] for p in self.curve], marker="o", label=self.method)
        if self.curve and "random_faithfulness" in self.curve[0]:
            randoms = [p["random_faithfulness"] for p in self.curve]
            ax.plot(sizes, randoms, marker="x", linestyle="--", label="random circuits")
        for level in (0.0, 1.0):  # the corrupted run and the full model
            ax.axhline(level, color="grey", linewidth=0.5)
        ax.set_xlabel("edges kept")
        ax.set_ylabel(f"faithfulness ({self.metric}; corrupted 0, full 1)")
        ax.legend()
        return save_figure(figure, path)

    def save(self, folder: str | Path) -> list[Path]:
        """JSON, DOT, the circuit's PNG and, where measured, the faithfulness curve's PNG."""
        written = super().save(folder)
        dot = Path(folder) / f"{self.name}.dot"
        dot.write_text(self.to_dot())
        written.append(dot)
        if self.curve:
            curve = Path(folder) / "faithfulness.png"
            self.plot_curve(curve)
            written.append(curve)
        return written


def _colour(score: float) -> str:
    """Blue for an edge whose corruption lowers the metric (it carries the answer), red
    otherwise."""
    return "#2b6cb0" if score <= 0 else "#c53030"


def faithfulness_curve(
    lm: LM,
    pairs: Sequence[ContrastPair],
    scores: torch.Tensor,
    sizes: Sequence[int],
    metric: str = "logit_diff",
    selection: str = "top",
    random_seeds: int = 3,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Faithfulness of the circuits of each size (edges before pruning), and the mean over
    `random_seeds` random circuits of the same size (random scores, same selection and
    pruning)."""
    graph = build_graph(lm)
    curve = []
    for size in sizes:
        edges = prune(graph, _selection(graph, scores, selection, size))
        point = {"size": size, "edges": int(edges.sum())}
        point.update(evaluate_edges(lm, pairs, edges, metric, batch_size))
        randoms = []
        for seed in range(random_seeds):
            generator = torch.Generator().manual_seed(seed)
            noise = torch.rand(scores.shape, generator=generator)
            random_edges = prune(graph, _selection(graph, noise, selection, size))
            randoms.append(evaluate_edges(lm, pairs, random_edges, metric, batch_size))
        if randoms:
            for key in ("faithfulness", "metric_kept", "hit"):
                point[f"random_{key}"] = sum(r[key] for r in randoms) / len(randoms)
        curve.append(point)
    return curve


def circuit(
    lm: LM,
    facts: Sequence[Any] | Sequence[ContrastPair],
    method: str = "eap-ig",
    steps: int = 5,
    metric: str = "logit_diff",
    selection: str = "top",
    size: float | None = None,
    curve: Sequence[int] = (),
    random_seeds: int = 3,
    seed: int = 0,
    batch_size: int = 32,
) -> Circuit:
    """Find a knowledge circuit for facts of one relation (`Fact`s, `EditRequest`s or dicts;
    each paired with a corrupted twin by `contrast_pairs`, or ready `ContrastPair`s).

    `selection` "top" keeps the `size` edges of largest |score| (default 10% of the edges),
    "threshold" those with |score| ≥ `size`, "greedy" grows `size` edges from the logits;
    dead edges are then pruned. `curve` lists sizes at which faithfulness is measured as well,
    each against `random_seeds` random circuits.
    """
    _check_choice("selection", selection, SELECTIONS)
    graph = build_graph(lm)
    pairs = list(facts)
    if not pairs or not isinstance(pairs[0], ContrastPair):
        pairs = contrast_pairs(lm, facts, seed)
    if size is None:
        size = max(1, round(0.1 * graph.n_edges)) if selection != "threshold" else 0.0
    scores = attribute(lm, pairs, method, steps, metric, batch_size)
    edges = prune(graph, _selection(graph, scores, selection, size))
    return Circuit(
        graph=graph,
        scores=scores,
        edges=edges,
        method=method,
        steps=steps,
        metric=metric,
        selection=selection,
        size=size,
        n_prompts=len(pairs),
        evaluation=evaluate_edges(lm, pairs, edges, metric, batch_size),
        curve=faithfulness_curve(
            lm, pairs, scores, list(curve), metric, selection, random_seeds, batch_size
        ),
    )
