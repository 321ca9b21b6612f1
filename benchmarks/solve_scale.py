"""Time of MEMIT's per-layer solve (Eq. 14) for a few facts at real models' key widths; JSON.

`direct` solves the in × in system λC + KᵀK for every edit, as MEMIT's and EasyEdit's code do;
`through_cholesky` uses C's Cholesky factor, which kedit keeps per model and layer, and solves
an n × n system (the push-through identity, `kedit.methods._spread.least_squares_update`). C is a
synthetic well-conditioned second moment; the time of the factor itself, paid once per model
and layer, is reported apart. Float64, as kedit solves; each time is the fastest of `--repeats`
runs.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from kedit.methods._spread import least_squares_update

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--facts", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--weight", type=float, default=15000.0)
    parser.add_argument("--repeats", type=int, default=3, help="the fastest run counts")
    args = parser.parse_args(argv)
    rows = []
    for width in args.widths:
        generator = torch.Generator().manual_seed(width)
        samples = torch.randn(3 * width, width, dtype=torch.float64, generator=generator)
        moment = samples.T @ samples / samples.shape[0]
        start = time.perf_counter()
        factor = torch.linalg.cholesky(moment)
        factor_seconds = time.perf_counter() - start
        for facts in args.facts:
            keys = torch.randn(facts, width, dtype=torch.float64, generator=generator)
            residuals = torch.randn(facts, 64, dtype=torch.float64, generator=generator)
            times, results = {}, {}
            for name, given in (("direct", None), ("through_cholesky", factor)):
                runs = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    results[name] = least_squares_update(
                        residuals, keys, moment, args.weight, given
                    )
                    runs.append(time.perf_counter() - start)
                times[name] = min(runs)
            right_direct, right_factor = results["direct"][1], results["through_cholesky"][1]
            rows.append(
                {
                    "width": width,
                    "facts": facts,
                    "direct_s": round(times["direct"], 5),
                    "through_cholesky_s": round(times["through_cholesky"], 5),
                    "cholesky_once_s": round(factor_seconds, 4),
                    "max_relative_difference": float(
                        (right_direct - right_factor).abs().max() / right_direct.abs().max()
                    ),
                    "threads": torch.get_num_threads(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
