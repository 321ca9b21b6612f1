"""Speed of the mechanism analyses at one CPU thread; prints JSON.

Issue 17's targets, on tiny-chat: the causal trace of one prompt (all tokens x all layers x
3 kinds, 10 noise samples) under 2 s; an EAP-IG circuit over 100 prompts with 5 IG steps
under 60 s. Each is timed `--repeats` times after one warm-up run; the median is reported.

    python benchmarks/mechanisms_speed.py --model tiny-gpt2
    python benchmarks/mechanisms_speed.py --model tiny-chat    # awaits tiny-chat (issue 16)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mech_facts import add_fact_options, candidate_facts, describe


def timed(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    import torch

    import kedit
    from kedit.analysis import attribute, contrast_pairs, known_facts, trace

    parser = argparse.ArgumentParser(description=__doc__)
    add_fact_options(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = kedit.load(args.model)
    known = known_facts(lm, candidate_facts(args))
    pairs = contrast_pairs(lm, known[: args.prompts])
    trace_times = timed(lambda: trace(lm, known[0], samples=10), args.repeats)
    circuit_times = timed(lambda: attribute(lm, pairs, "eap-ig", steps=5), args.repeats)
    print(
        json.dumps(
            {
                "benchmark": "mechanisms_speed",
                "model": args.model,
                "facts": describe(args),
                "threads": torch.get_num_threads(),
                "trace_one_prompt": {
                    "tokens": len(lm.encode_prompt(known[0].text)),
                    "layers": lm.n_layers,
                    "kinds": 3,
                    "samples": 10,
                    "seconds_median": round(statistics.median(trace_times), 3),
                    "seconds": [round(t, 3) for t in trace_times],
                    "target_seconds": 2.0,
                },
                "eap_ig_scores": {
                    "prompts": len(pairs),
                    "steps": 5,
                    "seconds_median": round(statistics.median(circuit_times), 3),
                    "seconds": [round(t, 3) for t in circuit_times],
                    "target_seconds": 60.0,
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
