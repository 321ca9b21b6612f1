"""Where things are inside each supported architecture family.

Methods never dispatch on model names: they ask a `Layout` for the module that plays a role
(the blocks, an MLP's output projection, the final norm, the unembedding). Supporting a new
family is one entry in `FAMILIES` plus a test on a tiny random model of that family.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose `config.model_type` has no `Layout`."""


@dataclass(frozen=True)
class Layout:
    """Module paths of one architecture family.

    Paths inside a block are relative to that block; the others are relative to the model.
    `conv1d` is true where weights are stored (in, out) as in GPT-2's `Conv1D`, instead of
    `nn.Linear`'s (out, in).

    The attention's inputs, for analyses that give each head its own input (knowledge
    circuits): `attn_norm` and `mlp_norm` are the norms in front of the attention and the MLP
    (the same module where the block runs both on one normed input); `qkv` names the query, key
    and value projections, or one fused projection whose output columns run kind by kind
    (`qkv_order="kind"`: all queries, all keys, all values) or head by head (`"head"`: each
    head's query, key and value in turn).
    """

    family: str
    blocks: str
    mlp_in: str
    mlp_out: str
    attn: str
    attn_out: str
    final_norm: str
    unembed: str
    embed: str
    mlp: str | None = "mlp"
    conv1d: bool = False
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_order: str = "kind"

    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_out}"

    def mlp_in_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.mlp_in}"

    def attn_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.attn}"

    def attn_out_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}.{self.attn_out}"

    def in_out(self, weight: torch.Tensor) -> tuple[int, int]:
        """(input width, output width) of a projection's weight, stored (in, out) where `conv1d`
        and (out, in) as `nn.Linear` stores it elsewhere."""
        rows, columns = weight.shape
        return (rows, columns) if self.conv1d else (columns, rows)

    def in_block(self, layer: int, path: str) -> str:
        """A path relative to a block, made relative to the model."""
        return f"{self.blocks}.{layer}.{path}"

    def mlp_name(self, layer: int) -> str:
        """The whole MLP of a block (its output projection where the family has no MLP module)."""
        if self.mlp is None:
            return self.mlp_out_name(layer)
        return f"{self.blocks}.{layer}.{self.mlp}"

    def n_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.blocks))


def _llama_like(family: str) -> Layout:
    return Layout(
        family=family,
        blocks="model.layers",
        mlp_in="mlp.up_proj",
        mlp_out="mlp.down_proj",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        final_norm="model.norm",
        unembed="lm_head",
        embed="model.embed_tokens",
    )


FAMILIES: dict[str, Layout] = {
    "gpt2": Layout(
        family="gpt2",
        blocks="transformer.h",
        mlp_in="mlp.c_fc",
        mlp_out="mlp.c_proj",
        attn="attn",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        conv1d=True,
        attn_norm="ln_1",
        mlp_norm="ln_2",
        qkv=("attn.c_attn",),
    ),
    "gptj": Layout(
        family="gptj",
        blocks="transformer.h",
        mlp_in="mlp.fc_in",
        mlp_out="mlp.fc_out",
        attn="attn",
        attn_out="attn.out_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        attn_norm="ln_1",
        mlp_norm="ln_1",  # attention and MLP run side by side on one normed input
        qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    ),
    "gpt_neox": Layout(
        family="gpt_neox",
        blocks="gpt_neox.layers",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        attn="attention",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",  # `embed_out` before transformers 5: found by `layout_for`
        embed="gpt_neox.embed_in",
        qkv=("attention.query_key_value",),
        qkv_order="head",
    ),
    "opt": Layout(
        family="opt",
        blocks="model.decoder.layers",
        mlp_in="fc1",
        mlp_out="fc2",
        attn="self_attn",
        attn_out="self_attn.out_proj",
        final_norm="model.decoder.final_layer_norm",
        unembed="lm_head",
        embed="model.decoder.embed_tokens",
        mlp=None,
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
    ),
    "phi": Layout(
        family="phi",
        blocks="model.layers",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="self_attn",
        attn_out="self_attn.dense",
        final_norm="model.final_layernorm",
        unembed="lm_head",
        embed="model.embed_tokens",
        mlp_norm="input_layernorm",  # attention and MLP run side by side on one normed input
    ),
    **{name: _llama_like(name) for name in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def layout_for(model: nn.Module) -> Layout:
    """The `Layout` of a transformers model, from its `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = FAMILIES.get(model_type)
    if layout is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(supported_families())}. To add one, add a Layout entry to "
            "kedit.layout.FAMILIES (module paths of its blocks, MLP projections, attention "
            "output, final norm, unembedding) and a test on a tiny random model of that family."
        )
    layout = _follow_output_embeddings(model, layout)
    for path in (layout.blocks, layout.final_norm, layout.unembed, layout.embed):
        try:
            model.get_submodule(path)
        except AttributeError as exc:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r}: expected module {path!r} is missing; the model "
                f"class {type(model).__name__} does not match the {layout.family} Layout"
            ) from exc
    return layout


def _follow_output_embeddings(model: nn.Module, layout: Layout) -> Layout:
    """The layout with `unembed` set to the model's own output embeddings where its path is
    missing: transformers renames them across versions (GPT-NeoX: `embed_out` -> `lm_head`)."""
    try:
        model.get_submodule(layout.unembed)
        return layout
    except AttributeError:
        pass
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        for name, module in model.named_modules():
            if module is head and name:
                return replace(layout, unembed=name)
    return layout
