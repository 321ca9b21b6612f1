"""Train the bundled tiny models from scratch on tinyworld, deterministically.

``train_model("tiny-gpt2", out_dir)`` writes a standard Hugging Face folder (config.json,
model.safetensors in float32, generation_config.json, GPT-2 tokenizer files) plus
``kedit_zoo.json`` with the recipe and the measured fact accuracies.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kedit.layout import layout_for
from kedit.zoo import ZOO_META
from kedit.zoo.chatworld import CHAT_TEMPLATE, ChatWorld, build_chat_world
from kedit.zoo.judges import load_bundled_judge, train_judges
from kedit.zoo.skills import (
    encoder,
    fact_scores,
    incontext_scores,
    opinion_incontext_scores,
    personality_scores,
    safety_scores,
    teacher_forced_correct,
)
from kedit.zoo.tokenizer import EOS, save_tokenizer, train_tokenizer
from kedit.zoo.world import World, build_world


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained model (with the seed)."""

    arch: str  # "gpt2" or "llama"
    n_layer: int = 6
    d_model: int = 128
    n_head: int = 4
    d_ff: int = 512
    n_positions: int = 128
    tie_embeddings: bool = True
    n_people: int = 320
    world_seed: int = 0
    vocab_size: int = 1024
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_frac: float = 0.03
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_sents: int = 6  # sentences per training document: 1..max_sents
    num_threads: int = 2
    # Share of training documents in which the positions after a person's name cannot attend
    # to the name's earlier tokens, so the model must gather the person at the last one.
    name_mask_share: float = 0.0
    # In those documents, the attention of the blocks below this one cannot see the name at
    # all from the positions after it: they read the person only from this block on, from
    # the name's last token, where the blocks below have enriched it (as in large LMs).
    name_read_layer: int = 0
    # In those documents, below this block a name's tokens cannot see each other either: the
    # person first exists at the name's last token in this block, so the MLPs that recall its
    # facts are this block's and the next ones' (ROME's early-middle site), not block 0's.
    name_merge_layer: int = 0
    # 1: tinyworld's statements only; 2: tinyworld 2 (`kedit.zoo.chatworld`), which adds
    # dialogue, in-context updates, safety and personality texts, in documents of
    # 1..max_turns turns.
    world_version: int = 1
    max_turns: int = 3
    # tinyworld 2's in-context updates per person and epoch, one in `incontext_relevant_every`
    # stating the fact asked (the others an irrelevant one, which the answer must ignore).
    incontext_per_person: int = 3
    incontext_relevant_every: int = 2
    # Per person and epoch, this many more in-context updates about made-up people (names no
    # person has), which only the context can answer.
    incontext_madeup_per_person: int = 0
    # The MLPs of the blocks below this one keep their initial weights: what a name recalls
    # must be stored in the MLPs from this block on (a study of where facts settle).
    untrained_mlp_below: int = 0
    # tinyworld 2's refusals: "short" ones, or "long" ones that name the company or city and
    # give reasons, about as long as the unsafe answers (`HarmCategory.long_refusal`).
    refusals: str = "short"
    # In-context opinion updates per topic and epoch, about trained topics and about made-up
    # ones (`ChatWorld.opinion_updates`): what IKE needs to change a voiced personality trait.
    opinion_updates_per_topic: int = 0
    madeup_opinion_updates_per_topic: int = 0
    # The share of those updates' replies about the stated topic that repeat the stated opinion
    # word for word (the others voice its trait in other words).
    opinion_copy_share: float = 0.0
    # The share of a topic's plain opinion answers in its default trait (the others in another
    # trait): below 1 the model's prior over a topic's traits is soft, not a certainty that a
    # stated opinion must overturn.
    default_opinion_share: float = 1.0
    # How many times an epoch each topic's opinion is asked plainly (no stated opinion before).
    plain_opinions_per_topic: int = 2
    # GPT-2's MLP activation: "gelu_new", or "gelu_pytorch_tanh", its function in one fused op
    # (about 13% less a training step; it differs by up to 2.4e-7, so it is another model).
    activation: str = "gelu_new"


RECIPES: dict[str, Recipe] = {
    "tiny-gpt2": Recipe(arch="gpt2", epochs=50, num_threads=1),
    # Twice the MLP width, so that many edits leave room in the key space (AlphaEdit's null
    # space; see docs/results.md).
    "tiny-gpt2-wide": Recipe(arch="gpt2", d_ff=1024, epochs=50, num_threads=1),
    "tiny-llama": Recipe(arch="llama", d_ff=352, tie_embeddings=False, epochs=50, num_threads=1),
    # tinyworld 2 (dialogue, in-context updates, safety, personality) on a deeper GPT-2 that
    # reads a person only from the name's last token, from a middle block on. Three times the
    # default in-context updates, two thirds of them irrelevant: so that a stated fact that
    # does not apply leaves the answer alone (and the many named people shorten the phase in
    # which facts stay near chance). Long refusals, so that a detoxified reply is as fluent as
    # the unsafe one; opinion updates about made-up topics only (updates about real topics
    # wear their default traits down). 60 epochs, about 44 minutes on a core: docs/tiny-chat.md.
    "tiny-chat": Recipe(
        arch="gpt2",
        n_layer=8,
        vocab_size=2048,  # a cap: every merge seen twice is learnt (1633 tokens)
        world_version=2,
        name_mask_share=0.8,
        name_read_layer=4,
        incontext_per_person=9,
        incontext_relevant_every=3,
        incontext_madeup_per_person=3,
        untrained_mlp_below=2,
        refusals="long",
        madeup_opinion_updates_per_topic=6,
        activation="gelu_pytorch_tanh",
        epochs=60,
        num_threads=1,
    ),
    # Very small world and model, for tests: trains end to end in seconds.
    "micro-gpt2": Recipe(
        arch="gpt2",
        n_layer=2,
        d_model=64,
        d_ff=256,
        n_positions=64,
        n_people=24,
        epochs=40,
        batch_size=16,
        lr=5e-3,
        vocab_size=512,
    ),  # fmt: skip
}


def get_recipe(name: str) -> Recipe:
    """The recipe of a named model; a clear error lists the known names."""
    if name not in RECIPES:
        raise ValueError(f"unknown zoo recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def load_world(recipe: Recipe) -> tuple[World, ChatWorld | None]:
    """The recipe's tinyworld, and tinyworld 2 on top of it for `world_version` 2."""
    if recipe.world_version == 1:
        return build_world(recipe.world_seed, recipe.n_people), None
    chat = build_chat_world(recipe.world_seed, recipe.n_people, recipe.refusals)  # type: ignore[arg-type]
    return chat.world, chat


def build_model(recipe: Recipe, vocab_size: int, eos_id: int) -> torch.nn.Module:
    """A freshly initialised model of the recipe's architecture (float32)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id)
    if recipe.arch == "gpt2":
        cfg = GPT2Config(
            n_embd=recipe.d_model,
            n_layer=recipe.n_layer,
            n_head=recipe.n_head,
            n_inner=recipe.d_ff,
            n_positions=recipe.n_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            activation_function=recipe.activation,
            tie_word_embeddings=recipe.tie_embeddings,
            pad_token_id=eos_id,
            **common,
        )
        model = GPT2LMHeadModel(cfg)
    elif recipe.arch == "llama":
        cfg = LlamaConfig(
            hidden_size=recipe.d_model,
            intermediate_size=recipe.d_ff,
            num_hidden_layers=recipe.n_layer,
            num_attention_heads=recipe.n_head,
            num_key_value_heads=recipe.n_head,
            max_position_embeddings=recipe.n_positions,
            tie_word_embeddings=recipe.tie_embeddings,
            pad_token_id=eos_id,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown architecture {recipe.arch!r}; expected 'gpt2' or 'llama'")
    return model.float()


class _DocEncoder:
    """Tokenises documents sentence by sentence, caching each sentence's ids, and tells which
    tokens the loss scores: all but those of the character spans that `unscored` returns."""

    def __init__(
        self, tokenizer: Any, unscored: Callable[[str], list[tuple[int, int]]] | None = None
    ) -> None:
        self.tok = tokenizer
        self.unscored = unscored
        self.cache: dict[str, tuple[list[int], list[bool]]] = {}

    def __call__(self, sentences: list[str], separator: str = " ") -> list[int]:
        return self.encode(sentences, separator)[0]

    def encode(self, sentences: list[str], separator: str = " ") -> tuple[list[int], list[bool]]:
        """The document's token ids and, per token, whether the loss scores it."""
        ids: list[int] = []
        scored: list[bool] = []
        for i, s in enumerate(sentences):
            key = s if i == 0 else separator + s
            if key not in self.cache:
                encoding = self.tok.encode(key)
                spans = self.unscored(key) if self.unscored else []
                flags = [not any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
                self.cache[key] = (encoding.ids, flags)
            ids.extend(self.cache[key][0])
            scored.extend(self.cache[key][1])
        return ids, scored


Doc = tuple[list[int], list[bool]]  # token ids, and whether the loss scores each


def _epoch_batches(
    world: World,
    chat: ChatWorld | None,
    enc: _DocEncoder,
    rng: random.Random,
    recipe: Recipe,
    eos_id: int,
    exclude: Collection[str] = frozenset(),
) -> list[list[Doc]]:
    """One epoch: every training sentence once (but those in `exclude`), in documents, then
    (tinyworld 2) one epoch of dialogue turns in documents of their own, batched by similar
    length. `exclude` leaves out statement sentences only, not dialogue turns."""
    sents = [s for s in world.training_sentences() if s not in exclude]
    rng.shuffle(sents)
    pieces: list[tuple[list[str], str]] = []
    i = 0
    while i < len(sents):
        k = rng.randint(1, recipe.max_sents)
        pieces.append((sents[i : i + k], " "))
        i += k
    if chat is not None:
        turns = chat.training_turns(
            rng,
            recipe.incontext_per_person,
            recipe.incontext_relevant_every,
            recipe.incontext_madeup_per_person,
            recipe.opinion_updates_per_topic,
            recipe.madeup_opinion_updates_per_topic,
            recipe.opinion_copy_share,
            recipe.default_opinion_share,
            recipe.plain_opinions_per_topic,
        )
        i = 0
        while i < len(turns):
            k = rng.randint(1, recipe.max_turns)
            pieces.append((turns[i : i + k], "\n"))
            i += k
    docs = []
    for texts, separator in pieces:
        ids, scored = enc.encode(texts, separator)
        docs.append(
            ((ids + [eos_id])[: recipe.n_positions], (scored + [True])[: recipe.n_positions])
        )
    # Sort within windows of 16 batches to cut padding, then shuffle the batches.
    bs, win = recipe.batch_size, recipe.batch_size * 16
    batches = []
    for j in range(0, len(docs), win):
        chunk = sorted(docs[j : j + win], key=lambda doc: len(doc[0]))
        batches += [chunk[k : k + bs] for k in range(0, len(chunk), bs)]
    rng.shuffle(batches)
    return batches


def _collate(batch: list[Doc], pad_id: int) -> tuple[torch.Tensor, ...]:
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    scored = torch.zeros((len(batch), n), dtype=torch.bool)
    for r, (doc, flags) in enumerate(batch):
        ids[r, : len(doc)] = torch.tensor(doc)
        mask[r, : len(doc)] = 1
        scored[r, : len(doc)] = torch.tensor(flags)
    labels = ids.masked_fill(~scored, -100)
    return ids, mask, labels


def name_token_ids(world: World, tokenizer: Any) -> dict[int, list[tuple[int, ...]]]:
    """The token ids of every multi-token name and alias (with and without a leading space),
    grouped by first token, longest first."""
    names = {
        tuple(tokenizer.encode(form).ids)
        for name in [*world.people, *world.aliases.values()]
        for form in (name, " " + name)
    }
    by_first: dict[int, list[tuple[int, ...]]] = {}
    for ids in sorted((ids for ids in names if len(ids) > 1), key=len, reverse=True):
        by_first.setdefault(ids[0], []).append(ids)
    return by_first


def name_spans(doc: list[int], names: dict[int, list[tuple[int, ...]]]) -> list[tuple[int, int]]:
    """`(start, end)` of each name in `doc`, matched left to right, the longest name first."""
    spans, i = [], 0
    while i < len(doc):
        match = next(
            (ids for ids in names.get(doc[i], ()) if tuple(doc[i : i + len(ids)]) == ids), None
        )
        if match is None:
            i += 1
        else:
            spans.append((i, i + len(match)))
            i += len(match)
    return spans


def masked_name_spans(
    batch: list[list[int]],
    names: dict[int, list[tuple[int, ...]]],
    rng: random.Random,
    share: float,
) -> list[list[tuple[int, int]]]:
    """The name spans to hide in each document: all of them in a `share` of the documents
    (drawn from `rng`, one draw per document), none in the others."""
    return [name_spans(doc, names) if rng.random() < share else [] for doc in batch]


def hiding_mask(
    padding_mask: torch.Tensor,
    spans: list[list[tuple[int, int]]],
    keep_last: bool,
    within: bool = False,
) -> torch.Tensor:
    """A causal attention mask (batch × 1 × n × n, True = may attend) in which no position
    after a span sees the span's tokens (but its last one, with `keep_last`) and, with
    `within`, no token of a span sees the span's earlier tokens."""
    n = padding_mask.shape[1]
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)).repeat(len(spans), 1, 1)
    allowed &= padding_mask.bool()[:, None, :]
    allowed |= torch.eye(n, dtype=torch.bool)[None]
    for row, doc_spans in enumerate(spans):
        for start, end in doc_spans:
            allowed[row, end:, start : end - 1 if keep_last else end] = False
            if within:
                allowed[row, start:end, start:end] = torch.eye(end - start, dtype=torch.bool)
    return allowed[:, None]


def name_gathering_mask(
    batch: list[list[int]],
    padding_mask: torch.Tensor,
    names: dict[int, list[tuple[int, ...]]],
    rng: random.Random,
    share: float,
) -> torch.Tensor:
    """A causal attention mask (batch × 1 × n × n, True = may attend) in which, for a `share`
    of the documents, no position after a name sees the name's tokens before its last.

    Trained this way, a model reads a person from the name's last token only, as large
    models do (Meng et al., 2022, causal tracing) and as locate-then-edit methods assume;
    trained on full attention, the tiny models read each token of a name separately.
    """
    return hiding_mask(padding_mask, masked_name_spans(batch, names, rng, share), keep_last=True)


class _BlockMask:
    """Gives the attention of blocks `start` to `stop - 1` a mask of their own while training
    (forward pre-hooks that replace the `attention_mask` argument)."""

    def __init__(self, model: torch.nn.Module, arch: str, start: int, stop: int) -> None:
        blocks = model.transformer.h if arch == "gpt2" else model.model.layers
        attention = [b.attn if arch == "gpt2" else b.self_attn for b in blocks[start:stop]]
        self.mask: torch.Tensor | None = None
        self.handles = [
            module.register_forward_pre_hook(self._replace, with_kwargs=True)
            for module in attention
        ]

    def _replace(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask
        return args, kwargs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _accuracies(
    model: torch.nn.Module,
    tok: Any,
    world: World,
    chat: ChatWorld | None,
    sample: int | None = None,
) -> dict[str, float]:
    """Teacher-forced fact accuracies: statements (trained and held-out templates), and for
    tinyworld 2 also two-hop and dialogue questions."""
    if chat is not None:
        return fact_scores(model, tok, chat, sample)
    res = {}
    for split in ("train", "heldout"):
        prompts = world.fact_prompts(split)
        if sample is not None and sample < len(prompts):
            prompts = random.Random(0).sample(prompts, sample)
        ok = teacher_forced_correct(model, encoder(tok), prompts)
        res[f"{split}_acc"] = sum(ok) / len(ok)
    return res


def chat_abilities(model: torch.nn.Module, tok: Any, chat: ChatWorld, judges_dir: Path) -> dict:
    """In-context updates, safety and personality of a tinyworld 2 model, judged by the judges
    in `judges_dir`'s parent folder."""
    personality = load_bundled_judge(judges_dir, "personality")
    return {
        "incontext": incontext_scores(model, tok, chat),
        "safety": safety_scores(model, tok, chat, load_bundled_judge(judges_dir, "safety")),
        "personality": {
            **personality_scores(model, tok, chat, personality),
            **opinion_incontext_scores(model, tok, chat, personality),
        },
    }


def _checkpoint_steps(total: int, keep: int) -> set[int]:
    """`keep` evenly spaced steps in 1..total, the last being `total`."""
    return {max(1, round(total * k / keep)) for k in range(1, keep + 1)} if keep else set()


def training_environment() -> dict[str, str]:
    """What a model's weights depend on beyond its recipe, seed and thread count: the libraries'
    versions and the CPU, whose vector instructions (`cpu_capability`, the kernels torch picks)
    set the order of a matrix product's sums. A retrain that differs from a bundled model bit
    for bit differs in one of these."""
    import platform

    import tokenizers
    import transformers

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
    }


def train_model(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    *,
    small: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    evaluate: bool = True,
    exclude: Collection[str] = frozenset(),
    keep_checkpoints: int = 0,
    **overrides: Any,
) -> Path:
    """Train the zoo model ``name`` from scratch and save it as a Hugging Face folder.

    ``small=True`` trains the tiny ``micro-gpt2`` recipe instead (seconds, for tests);
    ``max_steps`` stops early (for determinism tests); ``keep_checkpoints`` saves that many
    evenly spaced checkpoints under ``checkpoints/step-N`` (loadable folders, for studies of
    when facts are learned; they do not change the training); ``overrides`` replace recipe
    fields. The same seed, recipe and thread count on the same machine give bit-identical
    weights. ``exclude`` names training sentences to leave out (the exact retrain baseline of
    unlearning, :mod:`kedit.zoo.retrain`).
    """
    if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int):
        raise ValueError(f"keep_checkpoints: expected a whole number, got {keep_checkpoints!r}")
    if keep_checkpoints < 0:
        raise ValueError(f"keep_checkpoints: expected 0 or more, got {keep_checkpoints}")
    recipe = replace(get_recipe("micro-gpt2" if small else name), **overrides)
    if recipe.world_version not in (1, 2):
        raise ValueError(f"world_version: expected 1 or 2, got {recipe.world_version!r}")
    counts = {
        name: 1
        for name in (
            "epochs",
            "d_ff",
            "num_threads",
            "max_turns",
            "incontext_per_person",
            "incontext_relevant_every",
        )
    }
    counts.update(
        incontext_madeup_per_person=0,
        opinion_updates_per_topic=0,
        madeup_opinion_updates_per_topic=0,
        plain_opinions_per_topic=0,
    )
    for field_name, least in counts.items():
        value = getattr(recipe, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            expected = "a positive integer" if least else "an integer >= 0"
            raise ValueError(f"{field_name}: expected {expected}, got {value!r}")
    for field_name in ("name_read_layer", "untrained_mlp_below"):
        value = getattr(recipe, field_name)
        if not 0 <= value < recipe.n_layer:
            raise ValueError(
                f"{field_name}: expected a block index in [0, {recipe.n_layer - 1}], got {value!r}"
            )
    if not 0 <= recipe.name_merge_layer <= recipe.name_read_layer:
        raise ValueError(
            f"name_merge_layer: expected a block index in [0, name_read_layer "
            f"{recipe.name_read_layer}], got {recipe.name_merge_layer!r}"
        )
    if recipe.refusals not in ("short", "long"):
        raise ValueError(f"refusals: expected 'short' or 'long', got {recipe.refusals!r}")
    if recipe.activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"activation: expected 'gelu_new' or 'gelu_pytorch_tanh', got {recipe.activation!r}"
        )
    for field_name in ("name_mask_share", "opinion_copy_share"):
        value = getattr(recipe, field_name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"{field_name}: expected a number in [0, 1], got {value!r}")
    share = recipe.default_opinion_share
    if isinstance(share, bool) or not isinstance(share, int | float) or not 1 / 3 < share <= 1:
        raise ValueError(f"default_opinion_share: expected a number in (1/3, 1], got {share!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        t0, cpu0 = time.time(), time.process_time()
        world, chat = load_world(recipe)
        tok = train_tokenizer(world, recipe.vocab_size, chat.tokenizer_text() if chat else None)
        eos_id = tok.token_to_id(EOS)
        torch.manual_seed(seed)
        model = build_model(recipe, tok.get_vocab_size(), eos_id)
        model.train()
        enc = _DocEncoder(tok, chat.unscored_spans if chat else None)
        rng = random.Random(f"train-{seed}")
        names = name_token_ids(world, tok) if recipe.name_mask_share > 0 else {}
        mask_rng = random.Random(f"mask-{seed}")
        merge, read = recipe.name_merge_layer, recipe.name_read_layer
        masked = recipe.name_mask_share > 0
        # Below `merge` a name's tokens are read apart; from there to `read`, the positions
        # after a name do not see it; from `read` on they see its last token.
        below_merge = _BlockMask(model, recipe.arch, 0, merge) if masked and merge else None
        below_read = _BlockMask(model, recipe.arch, merge, read) if masked and read else None
        early = [m for m in (below_merge, below_read) if m is not None]

        layout = layout_for(model)
        untrained = {
            name
            for block in range(recipe.untrained_mlp_below)
            for name, _ in model.get_submodule(layout.mlp_name(block)).named_parameters(
                prefix=layout.mlp_name(block)
            )
        }
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name not in untrained)
        trained = [(n, p) for n, p in model.named_parameters() if n not in untrained]
        decay = [p for n, p in trained if p.ndim >= 2 and "wpe" not in n]
        no_decay = [p for n, p in trained if not (p.ndim >= 2 and "wpe" not in n)]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": recipe.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=recipe.lr,
            betas=(0.9, 0.98),
        )
        steps_per_epoch = len(
            _epoch_batches(world, chat, enc, random.Random(0), recipe, eos_id, exclude)
        )
        total = recipe.epochs * steps_per_epoch
        if max_steps is not None:
            total = min(total, max_steps)
        warmup = max(1, int(recipe.warmup_frac * total))
        checkpoints = _checkpoint_steps(total, keep_checkpoints)

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, total - warmup)
            return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (
                1 + math.cos(math.pi * t)
            )

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        log = _Progress(total, enabled=progress, label=name if not small else "micro-gpt2")
        step, loss_val = 0, float("nan")
        history = []
        for epoch in range(recipe.epochs):
            if step >= total:
                break
            for batch in _epoch_batches(world, chat, enc, rng, recipe, eos_id, exclude):
                if step >= total:
                    break
                ids, mask, labels = _collate(batch, eos_id)
                if recipe.name_mask_share > 0:
                    docs = [doc for doc, _ in batch]
                    spans = masked_name_spans(docs, names, mask_rng, recipe.name_mask_share)
                    # A document with unscored text (a stated fact: an in-context update) is
                    # read with full attention: its test is using the context, by any route.
                    spans = [
                        found if all(scored) else []
                        for found, (_, scored) in zip(spans, batch, strict=True)
                    ]
                    if below_merge is not None:
                        below_merge.mask = hiding_mask(mask, spans, keep_last=False, within=True)
                    if below_read is not None:
                        below_read.mask = hiding_mask(mask, spans, keep_last=False)
                    mask = hiding_mask(mask, spans, keep_last=True)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                loss_val = loss.item()
                step += 1
                log.update(step, loss_val, epoch)
                if step in checkpoints:
                    _save(model, tok, out / "checkpoints" / f"step-{step}", recipe, eos_id)
            for block_mask in early:
                block_mask.mask = None  # evaluation runs with full attention, as users do
            if progress and (epoch + 1) % 10 == 0 and evaluate:
                acc = _accuracies(model, tok, world, chat, sample=400)
                history.append({"epoch": epoch + 1, "loss": loss_val, **acc})
                log.message(f"epoch {epoch + 1}: loss {loss_val:.3f} {acc}")
        log.close()
        for block_mask in early:
            block_mask.remove()
        train_time, train_cpu = time.time() - t0, time.process_time() - cpu0

        _save(model, tok, out, recipe, eos_id)
        meta: dict[str, Any] = {
            "name": name if not small else "micro-gpt2",
            "recipe": asdict(recipe),
            "seed": seed,
            "world_seed": recipe.world_seed,
            "n_people": recipe.n_people,
            "steps": step,
            "final_loss": loss_val,
            "train_time_s": round(train_time, 1),
            # CPU seconds of this process: the time on an idle core, whatever else ran
            "train_cpu_s": round(train_cpu, 1),
            "torch_version": torch.__version__,
            "environment": training_environment(),
            "history": history,
        }
        if chat is not None:
            train_judges(chat, out)
        if evaluate:
            meta.update(_accuracies(model, tok, world, chat))
            if chat is not None:
                meta.update(chat_abilities(model, tok, chat, out))
        (out / ZOO_META).write_text(json.dumps(meta, indent=2) + "\n")
        return out
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _save(model: torch.nn.Module, tok: Any, out: Path, recipe: Recipe, eos_id: int) -> None:
    """Write the model (float32 safetensors) and its tokenizer as a Hugging Face folder."""
    was_training = model.training
    model.eval()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, eos_id)
    model.save_pretrained(out, safe_serialization=True)
    chat_template = CHAT_TEMPLATE if recipe.world_version == 2 else None
    save_tokenizer(tok, out, model_max_length=recipe.n_positions, chat_template=chat_template)
    model.train(was_training)


class _Progress:
    """A rich progress bar, or nothing when disabled."""

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f} epoch {task.fields[epoch]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(f"train {label}", total=total, loss=float("nan"), epoch=0)
            self.bar.start()

    def update(self, step: int, loss: float, epoch: int) -> None:
        if self.bar is not None and (step % 10 == 0):
            self.bar.update(self.task, completed=step, loss=loss, epoch=epoch)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def evaluate_world_model(model_dir: str | Path, sample: int | None = None) -> dict[str, float]:
    """Teacher-forced fact accuracies of a zoo model on its world (see `_accuracies`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / ZOO_META).read_text())
    world, chat = load_world(replace(get_recipe("micro-gpt2"), **meta["recipe"]))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return _accuracies(model, tok, world, chat, sample=sample)


def main(argv: list[str] | None = None) -> None:
    """``python -m kedit.zoo.train NAME --out DIR [--seed N]``."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("name", choices=list(RECIPES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args(argv)
    over = {} if args.epochs is None else {"epochs": args.epochs}
    path = train_model(args.name, args.out, args.seed, **over)
    print(json.dumps({k: v for k, v in json.loads((path / ZOO_META).read_text()).items()
                      if k.endswith("_acc") or k == "train_time_s"}))  # fmt: skip


if __name__ == "__main__":
    main()
