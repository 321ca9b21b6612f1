"""The computation graph of a native Hugging Face model, as knowledge-circuit methods see it.

Nodes that write into the residual stream ("senders"): the input embeddings, each attention
head's output (its slice of the attention output projection) and each MLP. Nodes that read
from it ("receivers"): each head's query input, each key/value group's key and value inputs
(one per head without grouped-query attention), each MLP's input and the logits. An edge
runs from every sender upstream of a receiver to it, so a receiver's input is the sum of its
senders' outputs (plus constant biases). In a block whose attention and MLP run side by side
(GPT-J, Phi, GPT-NeoX's parallel residual) the MLP does not read that block's heads.

`GraphRun` runs the model with each receiver given its own input: the residual stream
`x` plus `Σ_u patch[u, r] · (corrupted_u − current_u)` over its senders u, plus an optional
offset whose gradient is the gradient with respect to that receiver's input. Receivers'
inputs go through the block's own norm module and the projection's own weights, so every
family in `Layout` is handled alike; `build_graph` checks on the model that recomputing every
receiver this way reproduces the model's logits and that the residual stream is the sum of
the senders (a post-norm model, where it is not, is refused).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kedit.hooks import capture, replace_input, replace_output
from kedit.lm import LM

KINDS = ("q", "k", "v")
CHECK_TEXT = "The quick brown fox jumps over the lazy dog"
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-8}  # relative; 5e-2 for half types


@dataclass(frozen=True)
class Projection:
    """The receivers one q/k/v projection module computes: their indices among the layer's
    attention receivers, and per receiver its weight (width × head_dim), bias and output
    columns."""

    module: str
    receivers: list[int]
    weight: torch.Tensor
    bias: torch.Tensor | None
    columns: torch.Tensor


@dataclass(frozen=True)
class CircuitGraph:
    """Nodes and edges of a model's computation graph (see the module docstring).

    Senders are ordered input, then per layer its heads and its MLP; receivers per layer its
    heads' queries, its groups' keys, its groups' values and its MLP, then the logits.
    `real[u, r]` marks the edges; `upstream[r]` is how many senders precede receiver r.
    """

    n_layers: int
    n_heads: int
    n_groups: int
    head_dim: int
    parallel: tuple[bool, ...]
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    upstream: tuple[int, ...]

    @property
    def per_layer(self) -> int:
        """Receivers per layer: queries, keys, values, MLP."""
        return self.n_heads + 2 * self.n_groups + 1

    @property
    def real(self) -> torch.Tensor:
        mask = torch.zeros(len(self.senders), len(self.receivers), dtype=torch.bool)
        for receiver, count in enumerate(self.upstream):
            mask[:count, receiver] = True
        return mask

    @property
    def n_edges(self) -> int:
        return sum(self.upstream)

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def attention_receivers(self, layer: int) -> range:
        start = layer * self.per_layer
        return range(start, start + self.per_layer - 1)

    def mlp_receiver(self, layer: int) -> int:
        return layer * self.per_layer + self.per_layer - 1

    @property
    def logits_receiver(self) -> int:
        return len(self.receivers) - 1

    def receiver_node(self, receiver: int) -> list[int]:
        """The senders (nodes) whose input a receiver is: a query's head, all heads of a
        key/value group, an MLP; none for the logits."""
        if receiver == self.logits_receiver:
            return []
        layer, offset = divmod(receiver, self.per_layer)
        if offset == self.per_layer - 1:
            return [self.mlp_sender(layer)]
        if offset < self.n_heads:
            return [self.head_sender(layer, offset)]
        group = (offset - self.n_heads) % self.n_groups
        per_group = self.n_heads // self.n_groups
        heads = range(group * per_group, (group + 1) * per_group)
        return [self.head_sender(layer, head) for head in heads]

    def node_receivers(self) -> torch.Tensor:
        """(senders × receivers) bool: which receivers are inputs of which node."""
        table = torch.zeros(len(self.senders), len(self.receivers), dtype=torch.bool)
        for receiver in range(len(self.receivers)):
            for node in self.receiver_node(receiver):
                table[node, receiver] = True
        return table


def _receiver_names(n_layers: int, n_heads: int, n_groups: int) -> list[str]:
    unit = "h" if n_groups == n_heads else "g"
    names = []
    for layer in range(n_layers):
        names += [f"a{layer}.h{head}<q>" for head in range(n_heads)]
        for kind in ("k", "v"):
            names += [f"a{layer}.{unit}{group}<{kind}>" for group in range(n_groups)]
        names.append(f"m{layer}")
    return [*names, "logits"]


def _in_out(lm: LM, module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    return (
        (weight.shape[0], weight.shape[1])
        if lm.layout.conv1d
        else (weight.shape[1], weight.shape[0])
    )


def _head_shape(lm: LM) -> tuple[int, int, int]:
    """(heads, key/value groups, head width) read from the model's projections."""
    layout = lm.layout
    n_heads = int(lm.model.config.num_attention_heads)
    width_in, _ = _in_out(lm, lm.model.get_submodule(layout.attn_out_name(0)))
    head_dim = width_in // n_heads
    if len(layout.qkv) == 3:
        _, key_width = _in_out(lm, lm.model.get_submodule(layout.in_block(0, layout.qkv[1])))
        n_groups = key_width // head_dim
    else:
        _, total = _in_out(lm, lm.model.get_submodule(layout.in_block(0, layout.qkv[0])))
        n_groups = (total - n_heads * head_dim) // (2 * head_dim)
    if n_groups < 1 or n_heads % n_groups:
        raise ValueError(
            f"model: {n_heads} heads do not split into {n_groups} key/value groups; the "
            f"{layout.family} Layout's qkv entry does not match this model"
        )
    return n_heads, n_groups, head_dim


def _columns(lm: LM, graph: CircuitGraph, kind: int, unit: int) -> torch.Tensor:
    """Output columns of a query head / key or value group in its projection module."""
    dim, heads, groups = graph.head_dim, graph.n_heads, graph.n_groups
    if len(lm.layout.qkv) == 3:
        start = unit * dim
    elif lm.layout.qkv_order == "head":
        start = unit * 3 * dim + kind * dim
    else:
        start = (0, heads * dim, heads * dim + groups * dim)[kind] + unit * dim
    return torch.arange(start, start + dim)


def projections(lm: LM, graph: CircuitGraph, layer: int) -> list[Projection]:
    """The layer's q/k/v projection modules and the receivers each computes."""
    layout = lm.layout
    counts = (graph.n_heads, graph.n_groups, graph.n_groups)
    firsts = (0, graph.n_heads, graph.n_heads + graph.n_groups)
    if len(layout.qkv) == 3:
        modules = [(path, [kind]) for kind, path in enumerate(layout.qkv)]
    else:
        modules = [(layout.qkv[0], [0, 1, 2])]
    out = []
    for path, kinds in modules:
        module = lm.model.get_submodule(layout.in_block(layer, path))
        weight = module.weight.detach()
        weight = weight if layout.conv1d else weight.T  # (in, out)
        units = [(kind, unit) for kind in kinds for unit in range(counts[kind])]
        columns = torch.stack([_columns(lm, graph, kind, unit) for kind, unit in units])
        columns = columns.to(weight.device)
        out.append(
            Projection(
                module=layout.in_block(layer, path),
                receivers=[firsts[kind] + unit for kind, unit in units],
                weight=weight[:, columns].permute(1, 0, 2),
                bias=None if module.bias is None else module.bias.detach()[columns],
                columns=columns.reshape(-1),
            )
        )
    return out


def _output_heads(lm: LM, graph: CircuitGraph, layer: int) -> torch.Tensor:
    """Each head's slice of the attention output projection: (heads, head_dim, width)."""
    weight = lm.model.get_submodule(lm.layout.attn_out_name(layer)).weight.detach()
    weight = weight if lm.layout.conv1d else weight.T  # (heads × head_dim, width)
    return weight.reshape(graph.n_heads, graph.head_dim, -1)


def _mlp_entry(lm: LM, layer: int) -> str:
    """The module whose input is the normed MLP input."""
    if lm.layout.mlp is None:
        return lm.layout.mlp_in_name(layer)
    return lm.layout.mlp_name(layer)


class GraphRun:
    """Hooks for one forward pass over the graph (a context manager; see the module docstring).

    `corrupted` (senders × batch × seq × width) and `patch` (senders × receivers, 1 where the
    edge carries the corrupted value) patch edges; `offsets` (receivers × batch × seq × width)
    is added to every receiver's input; `inputs` replaces the input embeddings (the first
    block's input). With none of them the model runs as is and only records its senders.
    After the pass, `senders()` stacks the senders' outputs of this run.
    """

    def __init__(
        self,
        lm: LM,
        graph: CircuitGraph,
        corrupted: torch.Tensor | None = None,
        patch: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        recompute: bool = False,
    ) -> None:
        self.lm, self.graph = lm, graph
        self.corrupted, self.patch, self.offsets, self.inputs = corrupted, patch, offsets, inputs
        self.recompute = recompute or patch is not None or offsets is not None
        self._heads: dict[int, torch.Tensor] = {}
        self._weights = {layer: _output_heads(lm, graph, layer) for layer in range(graph.n_layers)}

    # --- the senders of this run -----------------------------------------------------------
    def _head_outputs(self, layer: int) -> torch.Tensor:
        if layer not in self._heads:
            z = self._captured[self.lm.layout.attn_out_name(layer)]
            z = z.reshape(*z.shape[:2], self.graph.n_heads, self.graph.head_dim)
            self._heads[layer] = torch.einsum("bshe,hed->hbsd", z, self._weights[layer].to(z))
        return self._heads[layer]

    def senders(self, count: int | None = None) -> torch.Tensor:
        """The first `count` senders' outputs of this run: (senders × batch × seq × width)."""
        graph, layout = self.graph, self.lm.layout
        count = len(graph.senders) if count is None else count
        parts = [self._captured[layout.block(0)][None]]
        for layer in range(graph.n_layers):
            if graph.head_sender(layer, 0) < count:
                parts.append(self._head_outputs(layer))
            if graph.mlp_sender(layer) < count:
                parts.append(self._captured[layout.mlp_name(layer)][None])
        return torch.cat(parts)[:count]

    # --- receivers' inputs -----------------------------------------------------------------
    def _shift(self, receivers: range | list[int], residual: torch.Tensor) -> torch.Tensor | None:
        """Δ added to `residual` for each receiver (receivers × batch × seq × width), or None
        where nothing changes."""
        shift = None
        if self.patch is not None:
            count = max(self.graph.upstream[r] for r in receivers)
            mask = self.patch[:count, list(receivers)].to(residual)
            if bool(mask.any()):
                difference = self.corrupted[:count].to(residual) - self.senders(count)
                shift = torch.einsum("ur,ubsd->rbsd", mask, difference)
        if self.offsets is not None:
            extra = self.offsets[list(receivers)].to(residual)
            shift = extra if shift is None else shift + extra
        return shift

    def _projection_hook(self, layer: int, projection: Projection) -> Any:
        norm = self.lm.model.get_submodule(self.lm.layout.in_block(layer, self.lm.layout.attn_norm))
        first = self.graph.attention_receivers(layer).start

        def compute(output: torch.Tensor) -> torch.Tensor:
            residual = self._captured[self.lm.layout.block(layer)]
            receivers = [first + r for r in projection.receivers]
            shift = self._shift(receivers, residual)
            inputs = residual[None] if shift is None else residual[None] + shift
            normed = norm(inputs).expand(len(receivers), *residual.shape)
            weight = projection.weight.to(normed)
            heads = torch.einsum("rbsd,rde->bsre", normed, weight)
            if projection.bias is not None:
                heads = heads + projection.bias.to(heads)
            new = output.new_empty(*heads.shape[:2], output.shape[-1])
            new[..., projection.columns.to(new.device)] = heads.flatten(2)
            return new

        return compute

    def _mlp_hook(self, layer: int) -> Any:
        layout = self.lm.layout
        norm = self.lm.model.get_submodule(layout.in_block(layer, layout.mlp_norm))
        receiver = self.graph.mlp_receiver(layer)

        def compute(normed_input: torch.Tensor) -> torch.Tensor:
            residual = self._captured[layout.block(layer)]
            if not self.graph.parallel[layer]:
                residual = residual + self._captured[layout.attn_name(layer)]
            shift = self._shift([receiver], residual)
            return norm(residual if shift is None else residual + shift[0])

        return compute

    def _logits_hook(self) -> Any:
        receiver = self.graph.logits_receiver

        def compute(residual: torch.Tensor) -> torch.Tensor:
            shift = self._shift([receiver], residual)
            return residual if shift is None else residual + shift[0]

        return compute

    def _replace_inputs(self, value: torch.Tensor) -> torch.Tensor:
        return self.inputs.to(value)

    # --- hooks ------------------------------------------------------------------------------
    @contextmanager
    def _taps(self) -> Iterator[dict[str, torch.Tensor]]:
        """Live (not detached) records of what the receivers and senders need: the blocks'
        inputs, the attention output projections' inputs (under their names), the attention
        modules' and the MLPs' outputs (under theirs)."""
        layout, layers = self.lm.layout, range(self.graph.n_layers)
        model = self.lm.model
        inputs = [layout.block(layer) for layer in layers]
        inputs += [layout.attn_out_name(layer) for layer in layers]
        outputs = [layout.attn_name(layer) for layer in layers]
        outputs += [layout.mlp_name(layer) for layer in layers]
        with (
            capture(model, inputs, "input", detach=False) as entering,
            capture(model, outputs, detach=False) as leaving,
        ):
            yield _Merged(entering, leaving)

    def __enter__(self) -> GraphRun:
        self._stack = ExitStack()
        model, layout = self.lm.model, self.lm.layout
        if self.inputs is not None:
            self._stack.enter_context(replace_input(model, layout.block(0), self._replace_inputs))
        self._captured = self._stack.enter_context(self._taps())
        if self.recompute:
            for layer in range(self.graph.n_layers):
                for projection in projections(self.lm, self.graph, layer):
                    hook = self._projection_hook(layer, projection)
                    self._stack.enter_context(replace_output(model, projection.module, hook))
                entry = _mlp_entry(self.lm, layer)
                self._stack.enter_context(replace_input(model, entry, self._mlp_hook(layer)))
            self._stack.enter_context(replace_input(model, layout.final_norm, self._logits_hook()))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


class _Merged(dict):
    """Two live records read as one (their module names do not overlap)."""

    def __init__(self, first: dict, second: dict) -> None:
        super().__init__()
        self._sources = (first, second)

    def __getitem__(self, name: str) -> torch.Tensor:
        for source in self._sources:
            if name in source:
                return source[name]
        raise KeyError(name)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@torch.no_grad()
def build_graph(lm: LM) -> CircuitGraph:
    """The computation graph of `lm`, checked on the model (see the module docstring);
    cached on the `LM`."""
    key = ("circuit_graph",)
    if key in lm.cache:
        return lm.cache[key]
    n_heads, n_groups, head_dim = _head_shape(lm)
    n_layers = lm.n_layers
    ids = torch.tensor([lm.encode_prompt(CHECK_TEXT)], device=lm.device)
    layout = lm.layout
    attn = [layout.attn_name(layer) for layer in range(n_layers)]
    attn_out = [layout.attn_out_name(layer) for layer in range(n_layers)]
    mlp = [layout.mlp_name(layer) for layer in range(n_layers)]
    norms = sorted({layout.in_block(layer, layout.mlp_norm) for layer in range(n_layers)})
    blocks = [layout.block(layer) for layer in range(n_layers)]
    model = lm.model
    with (
        capture(model, attn) as attn_outputs,
        capture(model, attn_out) as projected,
        capture(model, mlp) as mlp_outputs,
        capture(model, norms, "input") as norm_inputs,
        capture(model, [*blocks, layout.final_norm], "input") as entering,
    ):
        logits = model(input_ids=ids, use_cache=False).logits
    tolerance = CHECK_TOLERANCE.get(logits.dtype, 5e-2)
    parallel = []
    for layer in range(n_layers):
        if _relative_error(attn_outputs[attn[layer]], projected[attn_out[layer]]) > tolerance:
            raise ValueError(
                f"model: the attention output of layer {layer} is not its output projection's "
                "output; knowledge circuits need the heads to write straight into the residual "
                "stream"
            )
        residual = entering[blocks[layer]]
        norm_in = norm_inputs[layout.in_block(layer, layout.mlp_norm)]
        side_by_side = _relative_error(norm_in, residual)
        in_turn = _relative_error(norm_in, residual + attn_outputs[attn[layer]])
        parallel.append(side_by_side < in_turn)
        if min(side_by_side, in_turn) > tolerance:
            raise ValueError(
                f"model: the MLP of layer {layer} reads neither the block's input nor the "
                "input plus the attention output (a post-norm block?); knowledge circuits "
                "need a pre-norm residual stream"
            )
    writes = zip(attn, mlp, strict=True)
    total = entering[blocks[0]] + sum(attn_outputs[a] + mlp_outputs[m] for a, m in writes)
    if _relative_error(total, entering[layout.final_norm]) > tolerance:
        raise ValueError(
            "model: the residual stream entering the final norm is not the input embeddings "
            "plus every attention and MLP output (a post-norm model?); knowledge circuits need "
            "a pre-norm residual stream"
        )
    senders = ["input"]
    for layer in range(n_layers):
        senders += [f"a{layer}.h{head}" for head in range(n_heads)] + [f"m{layer}"]
    upstream = []
    for layer in range(n_layers):
        before = 1 + layer * (n_heads + 1)
        upstream += [before] * (n_heads + 2 * n_groups)
        upstream.append(before if parallel[layer] else before + n_heads)
    upstream.append(len(senders))
    graph = CircuitGraph(
        n_layers=n_layers,
        n_heads=n_heads,
        n_groups=n_groups,
        head_dim=head_dim,
        parallel=tuple(parallel),
        senders=tuple(senders),
        receivers=tuple(_receiver_names(n_layers, n_heads, n_groups)),
        upstream=tuple(upstream),
    )
    with GraphRun(lm, graph, recompute=True):
        recomputed = model(input_ids=ids, use_cache=False).logits
    if _relative_error(recomputed, logits) > tolerance:
        raise ValueError(
            f"model: recomputing each head's query, key and value input from the "
            f"{layout.family} Layout's qkv entry ({layout.qkv}, order {layout.qkv_order!r}) does "
            "not reproduce the model's logits; the Layout does not match this model"
        )
    lm.cache[key] = graph
    return graph
