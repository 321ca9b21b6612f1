"""How long the second moment of a 1.5B model over 100,000 Wikitext samples takes; prints JSON.

No 1.5B model or Wikitext fits this offline 2-core machine, so the time is measured on a
randomly initialised GPT-2 of GPT-2 XL's width (1600; its keys are 6400 wide, as GPT-2 XL's)
but few blocks, collecting at its deepest block with `kedit.stats.second_moments` (the
collection stops the forward pass there), on synthetic documents of Wikitext-103's typical
length. The rate it reaches, in floating-point operations per second, is then applied to the
operations GPT-2 XL needs up to ROME's layer 17 (MEMIT's layers 13-17 in the same pass) for the
tokens of 100,000 samples. Operations counted per token: 2 × the weights of every block run
(attention and MLP matrices), the attention scores (4 × width × context), and 2 × 6400² per
collected layer for k kᵀ. The GPU figure assumes a throughput, stated in the output; it is not
a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

XL_WIDTH, XL_LAYERS, XL_VOCAB = 1600, 48, 50257
ROME_LAYER, MEMIT_LAYERS = 17, [13, 14, 15, 16, 17]


def flops_per_token(width: int, blocks_run: int, collected: int, context: int) -> float:
    """Operations per token of a collection pass that runs `blocks_run` GPT-2 blocks."""
    block_weights = 12 * width * width  # attention 4·w², MLP 8·w²
    attention_scores = 4 * width * context
    key_width = 4 * width
    return blocks_run * (2 * block_weights + attention_scores) + collected * 2 * key_width**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3, help="blocks of the small model")
    parser.add_argument("--docs", type=int, default=160, help="synthetic documents collected")
    parser.add_argument(
        "--doc-tokens",
        type=int,
        default=110,
        help="mean tokens per sample, of the synthetic documents and of the extrapolation "
        "(Wikitext-103's non-empty lines: about 90 words, 110 GPT-2 tokens; an assumption)",
    )
    parser.add_argument("--samples", type=int, default=100_000, help="samples to extrapolate to")
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=200.0,
        help="assumed achieved TFLOP/s of one H100 in bfloat16 (about a fifth of its peak)",
    )
    parser.add_argument(
        "--gpu-fp32-tflops",
        type=float,
        default=40.0,
        help="assumed achieved TFLOP/s of one H100 in float32 without TF32 (peak 67)",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    os.environ["KEDIT_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    from kedit.lm import LM
    from kedit.stats import second_moments
    from kedit.zoo import model_path

    tokenizer = GPT2TokenizerFast.from_pretrained(model_path("tiny-gpt2"))
    tokenizer.model_max_length = 1024
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=XL_WIDTH,
        n_layer=args.blocks,
        n_head=25,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    lm = LM(GPT2LMHeadModel(config), tokenizer, name="random-gpt2-xl-width")
    rng = random.Random(0)
    docs = [  # token ids decoded to text: about doc_tokens tokens each once re-tokenised
        tokenizer.decode(
            [rng.randrange(200, len(tokenizer)) for _ in range(max(5, int(rng.gauss(n, 40))))]
        )
        for n in [args.doc_tokens] * args.docs
    ]
    layer = args.blocks - 1
    with tempfile.TemporaryDirectory(prefix="kedit-stats-scale-") as folder:
        corpus = os.path.join(folder, "docs.txt")
        with open(corpus, "w", encoding="utf-8") as handle:
            handle.write("\n".join(docs))
        os.environ["KEDIT_CACHE"] = os.path.join(folder, "cache")
        tokens = sum(min(256, len(tokenizer(d)["input_ids"])) for d in docs)
        start, cpu_start = time.perf_counter(), time.process_time()
        second_moments(lm, [layer], corpus=corpus, n_samples=args.docs, progress=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    # At one thread the CPU time is the computation's own time, whatever else the machine runs.
    busy = cpu_seconds if args.threads == 1 else seconds
    context = tokens / args.docs
    measured_flops = tokens * flops_per_token(XL_WIDTH, args.blocks, 1, int(context))
    rate = measured_flops / busy
    xl_tokens = args.samples * args.doc_tokens
    xl_flops = xl_tokens * flops_per_token(
        XL_WIDTH, ROME_LAYER + 1, len(MEMIT_LAYERS), args.doc_tokens
    )
    print(
        json.dumps(
            {
                "measured": {
                    "model": f"random GPT-2, width {XL_WIDTH}, {args.blocks} blocks, float32",
                    "collected_layer": layer,
                    "documents": args.docs,
                    "tokens": tokens,
                    "seconds": round(seconds, 2),
                    "cpu_seconds": round(cpu_seconds, 2),
                    "tokens_per_s": round(tokens / busy, 1),
                    "gflops_per_s": round(rate / 1e9, 1),
                    "threads": args.threads,
                },
                "extrapolated_gpt2_xl": {
                    "samples": args.samples,
                    "assumed_tokens_per_sample": args.doc_tokens,
                    "tokens": int(xl_tokens),
                    "blocks_run": ROME_LAYER + 1,
                    "layers_collected": MEMIT_LAYERS,
                    "tflop": round(xl_flops / 1e12, 1),
                    "cpu_hours_at_measured_rate": round(xl_flops / rate / 3600, 1),
                    "h100_minutes_at_assumed_rate": round(
                        xl_flops / (args.gpu_tflops * 1e12) / 60, 2
                    ),
                    "assumed_h100_tflops": args.gpu_tflops,
                    "h100_float32_minutes_at_assumed_rate": round(
                        xl_flops / (args.gpu_fp32_tflops * 1e12) / 60, 2
                    ),
                    "assumed_h100_float32_tflops": args.gpu_fp32_tflops,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
