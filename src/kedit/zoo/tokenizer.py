"""A byte-level BPE tokenizer for tinyworld, saved as standard GPT-2 tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kedit.zoo.world import World

EOS = "<|endoftext|>"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def train_tokenizer(
    world: World, vocab_size: int = 1024, extra_text: list[str] | None = None
) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE on the world's text and `extra_text` (which must not
    name people: see below), deterministically."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Each name is seen once, so no merge spans a whole surname (min_frequency=2): subjects
    # stay multi-token, as in real LMs, while template words and answers become single tokens.
    text = []
    for rel in world.relations.values():
        text += [t.format("") + " " + a for t in rel.templates for a in world.candidates(rel.name)]
        text += [rel.question.format(c) for c in world.cities]
    text += world.people
    firsts = sorted({p.split(" ")[0] for p in world.people})
    text += [f"{f}. {f} {f}." for f in firsts]  # first names, with and without a space
    text += extra_text or []
    tok.train_from_iterator(text, trainer=trainer)
    return tok


def save_tokenizer(
    tok: Tokenizer,
    out_dir: str | Path,
    model_max_length: int = 128,
    chat_template: str | None = None,
) -> Path:
    """Write vocab.json, merges.txt, tokenizer.json and the transformers config files (with the
    chat template, if any, that `apply_chat_template` uses)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))  # vocab.json + merges.txt
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        **special,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out
