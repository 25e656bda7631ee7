"""The noise multiplier each accountant calibrates for the paper's Table 8 settings, and what it spends.

For N = 1020 (Oxford Flowers), delta = 1/N, q = 0.251 (int(1/q) = 3 Poisson steps per epoch) and the
epochs of Table 8's three methods (FFT 180, LoRA 80, LNTuning 100), for target epsilon 1/10/100/1000:
sigma from each of `pld`, `rdp` (our wide orders), `prv` and, for reference, Opacus'
`get_noise_multiplier` with its default RDP orders (what arbooth used before), each with the epsilon that
sigma actually spends according to PLD (the tightest of them). A calibration that fails prints its
one-line error. Writes benchmarks/results/dp_accountants.json.

    OMP_NUM_THREADS=1 python benchmarks/dp_accountants.py            # PRV makes it ~20-40 min on a CPU
    python benchmarks/dp_accountants.py --accountants pld rdp        # a minute or two
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

N, Q = 1020, 0.251
EPOCHS = {"fft": 180, "lora": 80, "lntuning": 100}


def main() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    from arbooth.errors import ConfigError
    from arbooth.privacy.accountants import calibrate_noise, epsilon_of

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accountants", nargs="+", default=["pld", "rdp", "prv", "opacus_rdp"])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1, 10, 100, 1000])
    p.add_argument("--json", default="benchmarks/results/dp_accountants.json")
    args = p.parse_args()
    delta, rows = 1 / N, []
    t_all = time.perf_counter()
    for method, epochs in EPOCHS.items():
        steps = epochs * int(1 / Q)
        for eps in args.epsilons:
            for acc in args.accountants:
                t0 = time.perf_counter()
                row = {"method": method, "epochs": epochs, "steps": steps, "target_epsilon": eps, "accountant": acc}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PRV's numpy overflows, Opacus' order-range warning
                    try:
                        if acc == "opacus_rdp":
                            sigma = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=Q,
                                                         steps=steps, accountant="rdp")
                        else:
                            sigma = calibrate_noise(target_epsilon=eps, delta=delta, sample_rate=Q, steps=steps,
                                                    accountant=acc)
                        row["sigma"] = sigma
                        row["pld_epsilon"] = epsilon_of("pld", sigma=sigma, sample_rate=Q, steps=steps, delta=delta,
                                                        epsilon_hint=eps)
                    except ConfigError as e:
                        row["error"] = str(e)
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                shown = (f"sigma {row['sigma']:.4f}  PLD epsilon {row['pld_epsilon']:.4g}" if "sigma" in row
                         else f"ERROR {row['error']}")
                print(f"{method:8s} {epochs:3d} ep {steps:3d} steps  eps {eps:6g}  {acc:10s} {shown}  "
                      f"({row['seconds']:.0f} s)", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"N": N, "delta": delta, "q": Q, "rows": rows,
                                           "wall_s": time.perf_counter() - t_all}, indent=2))
    print(f"wrote {args.json} ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
