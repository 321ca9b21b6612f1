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
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kedit.zoo import ZOO_META
from kedit.zoo.tokenizer import EOS, save_tokenizer, train_tokenizer
from kedit.zoo.world import FactPrompt, World, build_world


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


RECIPES: dict[str, Recipe] = {
    "tiny-gpt2": Recipe(arch="gpt2", epochs=50, num_threads=1),
    # Twice the MLP width, so that many edits leave room in the key space (AlphaEdit's null
    # space; see docs/results.md).
    "tiny-gpt2-wide": Recipe(arch="gpt2", d_ff=1024, epochs=50, num_threads=1),
    "tiny-llama": Recipe(arch="llama", d_ff=352, tie_embeddings=False, epochs=50, num_threads=1),
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
    """Tokenises documents sentence by sentence, caching each sentence's ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, sentences: list[str]) -> list[int]:
        ids: list[int] = []
        for i, s in enumerate(sentences):
            key = s if i == 0 else " " + s
            if key not in self.cache:
                self.cache[key] = self.tok.encode(key).ids
            ids.extend(self.cache[key])
        return ids


def _epoch_batches(
    world: World,
    enc: _DocEncoder,
    rng: random.Random,
    recipe: Recipe,
    eos_id: int,
    exclude: Collection[str] = frozenset(),
) -> list[list[list[int]]]:
    """One epoch: every training sentence once (but those in `exclude`), in documents, batched
    by similar length."""
    sents = [s for s in world.training_sentences() if s not in exclude]
    rng.shuffle(sents)
    docs, i = [], 0
    while i < len(sents):
        k = rng.randint(1, recipe.max_sents)
        ids = enc(sents[i : i + k]) + [eos_id]
        docs.append(ids[: recipe.n_positions])
        i += k
    # Sort within windows of 16 batches to cut padding, then shuffle the batches.
    bs, win = recipe.batch_size, recipe.batch_size * 16
    batches = []
    for j in range(0, len(docs), win):
        chunk = sorted(docs[j : j + win], key=len)
        batches += [chunk[k : k + bs] for k in range(0, len(chunk), bs)]
    rng.shuffle(batches)
    return batches


def _collate(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    n = max(len(d) for d in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for r, d in enumerate(batch):
        ids[r, : len(d)] = torch.tensor(d)
        mask[r, : len(d)] = 1
    labels = ids.masked_fill(mask == 0, -100)
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
    n = padding_mask.shape[1]
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)).repeat(len(batch), 1, 1)
    allowed &= padding_mask.bool()[:, None, :]
    allowed |= torch.eye(n, dtype=torch.bool)[None]
    for row, doc in enumerate(batch):
        if rng.random() >= share:
            continue
        for start, end in name_spans(doc, names):
            allowed[row, end:, start : end - 1] = False
    return allowed[:, None]


@torch.no_grad()
def fact_accuracy(
    model: torch.nn.Module, tokenizer: Any, prompts: list[FactPrompt], batch_size: int = 256
) -> list[bool]:
    """Whether greedy decoding reproduces every answer token of each prompt (batched).

    Teacher-forced argmax over the answer positions: equal to greedy exact match.
    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers tokenizer.
    """

    def encode(text: str) -> list[int]:
        out = tokenizer.encode(text)
        return out.ids if hasattr(out, "ids") else list(out)

    was_training = model.training
    model.eval()
    rows = [(encode(p.prompt), encode(p.answer)) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    correct = [False] * len(rows)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        seqs = [rows[i][0] + rows[i][1] for i in idx]
        ids, mask, _ = _collate(seqs, 0)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for r, i in enumerate(idx):
            p, a = rows[i]
            start = len(p) - 1
            correct[i] = pred[r, start : start + len(a)].tolist() == a
    model.train(was_training)
    return correct


def _accuracies(model: torch.nn.Module, tok: Any, world: World, sample: int | None = None):
    res = {}
    for split in ("train", "heldout"):
        prompts = world.fact_prompts(split)
        if sample is not None and sample < len(prompts):
            prompts = random.Random(0).sample(prompts, sample)
        ok = fact_accuracy(model, tok, prompts)
        res[f"{split}_acc"] = sum(ok) / len(ok)
    return res


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
    **overrides: Any,
) -> Path:
    """Train the zoo model ``name`` from scratch and save it as a Hugging Face folder.

    ``small=True`` trains the tiny ``micro-gpt2`` recipe instead (seconds, for tests);
    ``max_steps`` stops early (for determinism tests); ``overrides`` replace recipe fields.
    ``exclude`` names training sentences to leave out (the exact retrain baseline of
    unlearning, :mod:`kedit.zoo.retrain`).
    The same seed, recipe and thread count on the same machine give bit-identical weights.
    """
    recipe = replace(get_recipe("micro-gpt2" if small else name), **overrides)
    for field_name in ("epochs", "d_ff", "num_threads"):
        value = getattr(recipe, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field_name}: expected a positive integer, got {value!r}")
    if not 0 <= recipe.name_mask_share <= 1:
        raise ValueError(
            f"name_mask_share: expected a number in [0, 1], got {recipe.name_mask_share!r}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        t0 = time.time()
        world = build_world(recipe.world_seed, recipe.n_people)
        tok = train_tokenizer(world, recipe.vocab_size)
        eos_id = tok.token_to_id(EOS)
        torch.manual_seed(seed)
        model = build_model(recipe, tok.get_vocab_size(), eos_id)
        model.train()
        enc = _DocEncoder(tok)
        rng = random.Random(f"train-{seed}")
        names = name_token_ids(world, tok) if recipe.name_mask_share > 0 else {}
        mask_rng = random.Random(f"mask-{seed}")

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wpe" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wpe" not in n)]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": recipe.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=recipe.lr,
            betas=(0.9, 0.98),
        )
        steps_per_epoch = len(_epoch_batches(world, enc, random.Random(0), recipe, eos_id, exclude))
        total = recipe.epochs * steps_per_epoch
        if max_steps is not None:
            total = min(total, max_steps)
        warmup = max(1, int(recipe.warmup_frac * total))

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
            for batch in _epoch_batches(world, enc, rng, recipe, eos_id, exclude):
                if step >= total:
                    break
                ids, mask, labels = _collate(batch, eos_id)
                if recipe.name_mask_share > 0:
                    mask = name_gathering_mask(batch, mask, names, mask_rng, recipe.name_mask_share)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                loss_val = loss.item()
                step += 1
                log.update(step, loss_val, epoch)
            if progress and (epoch + 1) % 10 == 0 and evaluate:
                acc = _accuracies(model, tok, world, sample=400)
                history.append({"epoch": epoch + 1, "loss": loss_val, **acc})
                log.message(f"epoch {epoch + 1}: loss {loss_val:.3f} {acc}")
        log.close()
        train_time = time.time() - t0

        model.eval()
        model.generation_config.pad_token_id = eos_id
        model.generation_config.bos_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(tok, out, model_max_length=recipe.n_positions)
        meta: dict[str, Any] = {
            "name": name if not small else "micro-gpt2",
            "recipe": asdict(recipe),
            "seed": seed,
            "world_seed": recipe.world_seed,
            "n_people": recipe.n_people,
            "steps": step,
            "final_loss": loss_val,
            "train_time_s": round(train_time, 1),
            "torch_version": torch.__version__,
            "history": history,
        }
        if evaluate:
            meta.update(_accuracies(model, tok, world))
        (out / ZOO_META).write_text(json.dumps(meta, indent=2) + "\n")
        return out
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


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
    """Greedy fact accuracy of a zoo model on its world's training and held-out templates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / ZOO_META).read_text())
    world = build_world(meta["world_seed"], meta["n_people"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    class _Enc:  # plain ids, no special tokens, as the training data was encoded
        def encode(self, text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

    return _accuracies(model, _Enc(), world, sample=sample)


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
