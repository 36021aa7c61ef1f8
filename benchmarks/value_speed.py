"""Speed of the value (v*) optimisation alone: the step every locate-then-edit method spends most of its time in.

    python benchmarks/value_speed.py --model smollm2-135m --n 100 --layer 8          # MEMIT's value site there
    python benchmarks/value_speed.py --model gemma3-270m --n 20 --layer 3 --threads 1

Runs ``lmedit.core.values.optimize_values`` for the first ``--n`` requests of ``--dataset`` at the output of
decoder layer ``--layer`` with MEMIT's batching (``value_batch`` 16) and the value hyperparameters of the peer
comparison (``benchmarks/peers.py``: EasyEdit's llama ones), and prints one JSON line: wall and CPU seconds,
``value_timing`` (``positions`` = suffix positions computed, padding included; ``row_steps``), the steps summed
over requests and the mean final loss - the last two must not change when only the speed does.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="bundled")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--layer", type=int, default=8, help="decoder layer whose output gets the delta")
    ap.add_argument(
        "--templates", type=int, default=6, help="the plain prompt and the first N-1 fixed prefixes"
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    import lmedit
    from lmedit.core.keys import DEFAULT_TEMPLATES
    from lmedit.core.values import optimize_values
    from lmedit.data.loaders import load_dataset

    torch.set_num_threads(args.threads)
    loaded = lmedit.load_model(args.model)
    reqs = [r for c in load_dataset(args.dataset, n=args.n).cases for r in c.requests]
    site = loaded.arch.module_name("layer", args.layer)
    kw = dict(lr=0.5, kl_factor=0.0625, weight_decay=1e-3, clamp_norm_factor=4.0, batch_requests=16)
    t, c = time.perf_counter(), time.process_time()
    res = optimize_values(loaded, reqs, [site], list(DEFAULT_TEMPLATES[: args.templates]), **kw)
    out = {
        "model": args.model,
        "requests": len(reqs),
        "wall_s": time.perf_counter() - t,
        "cpu_s": time.process_time() - c,
        "value_timing": res.timing,
        "steps": sum(res.steps),
        "mean_loss": sum(res.loss) / len(res.loss),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
