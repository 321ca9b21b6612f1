import os
import tempfile

import pytest

# Statistics and other caches of a test run go to a fresh folder, never the user's cache.
os.environ["KEDIT_CACHE"] = tempfile.mkdtemp(prefix="kedit-test-cache-")


@pytest.fixture(scope="session")
def tiny_gpt2():
    """The bundled GPT-2-architecture model, loaded once per test session."""
    import kedit

    return kedit.load("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    import kedit

    return kedit.load("tiny-llama")


SENTENCES = [
    "Mira Olsen lives in Lisbon.",
    "Tomas Berg lives in Oslo.",
    "Ana Costa works as a teacher in Porto.",
    "The capital of Norway is Oslo.",
    "The mother tongue of Mira Olsen is Danish.",
    "Paris is a city in France, and Berlin is a city in Germany.",
]


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small GPT-2-style byte-level BPE tokenizer trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture
def random_gpt2(bpe_tokenizer):
    """A fresh 2-layer GPT-2 with random (seeded) weights and the small BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kedit.lm import LM

    torch.manual_seed(0)
    eos = bpe_tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(bpe_tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    return LM(GPT2LMHeadModel(config), bpe_tokenizer, name="random-gpt2")


@pytest.fixture(scope="session")
def mean_target_nll():
    """`nll(lm, prompt, target)`: the mean NLL of the target's tokens after the prompt, from
    one plain forward pass (a reference independent of kedit's batched scoring)."""
    import torch

    @torch.no_grad()
    def nll(lm, prompt, target):
        prompt_ids, target_ids = lm.encode_prompt(prompt), lm.encode(target)
        ids = torch.tensor([prompt_ids + target_ids], device=lm.device)
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
        first = len(prompt_ids) - 1
        picked = [logp[first + k, token].item() for k, token in enumerate(target_ids)]
        return -sum(picked) / len(target_ids)

    return nll
