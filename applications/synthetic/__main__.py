"""``python -m applications.synthetic [--out runs/synthetic] [--quick]``: run the F.1 study, write JSON + PNG."""

from __future__ import annotations

import argparse
import sys

import torch

from .study import METHODS, k_grid, run_study, save_study


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m applications.synthetic", description=__doc__)
    parser.add_argument("--out", default="runs/synthetic", help="output folder (default: runs/synthetic)")
    parser.add_argument("--quick", action="store_true", help="8 values of K instead of 16")
    parser.add_argument("--k-max", type=int, default=1000, help="largest number of inner GD steps (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=1e-6,
                        help="the adaptive mode's target on the absolute error ||g - g*|| (default 1e-6)")
    args = parser.parse_args(argv)
    if args.k_max < 1:
        parser.error(f"--k-max must be >= 1, got {args.k_max}")
    if not args.target > 0:
        parser.error(f"--target must be > 0, got {args.target}")
    torch.set_num_threads(min(4, torch.get_num_threads()))
    ks = k_grid(args.k_max, 8 if args.quick else 16)
    results = run_study(ks=ks, quick=args.quick, seed=args.seed, target_error=args.target)
    json_path, png_path = save_study(results, args.out)

    for name, r in results["regimes"].items():
        print(f"\n{name}: n = {r['n_train']}, {r['distinct_eigenvalues']} distinct eigenvalues, "
              f"kappa = {r['condition_number']:.1f}, ||g*|| = {r['exact_norm']:.3g}; relative errors")
        header = f"{'K':>6} " + " ".join(f"{m:>14}" for m in METHODS) + f" {'certificate':>14} {'+inner it':>9}"
        print(header)
        for i, k in enumerate(r["K"]):
            row = " ".join(f"{_fmt(r['errors'][m][i]):>14}" for m in METHODS)
            print(f"{k:>6} {row} {_fmt(r['adaptive']['certificate_relative'][i]):>14} "
                  f"{r['adaptive']['inner_iterations'][i]:>9}")
        fl = r["floors_at_largest_K"]
        print(f"floors at K = {r['K'][-1]}: 2 CG steps {_fmt(fl['imaml_cg2'])}, 5 CG steps {_fmt(fl['imaml_cg5'])}, "
              f"first-order MAML {_fmt(fl['fomaml'])}; MAML below the 5-step floor from K = {r['maml_beats_cg5_at']}")
    print(f"\nwrote {json_path} and {png_path} in {results['runtime_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
