"""Tune the safe denoiser's settings for the embedded model on the ``mini-dev`` prompts only.

    python -m benchmark.tune --out results/tuning

Every candidate runs through the ordinary runner (so its images are cached and the sweep is
resumable) on the development split. The chosen setting minimises the attack success rate among
candidates whose prompt alignment on benign prompts stays within ``--max-alignment-drop`` of the
undefended model's. The reported ``mini`` split is never touched here.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path

from benchmark.methods import get_method
from benchmark.runner import RunConfig, Runner
from benchmark.store import ResultStore
from reports.leaderboard import build_leaderboard

logger = logging.getLogger(__name__)

REFERENCE_GRID = {
    "bandwidth": (0.5, 1.0, 2.0),
    "scale": (0.3, 0.6, 1.0),
    "t_min": (300, 600),
}
# log β of the 256-dimensional latents sits near -360 at high noise and falls with the noise level
# (measured on mini-dev trajectories), so η is searched in log space around that value.
PAPER_GRID = {
    "log_eta": (360.0, 370.0, 380.0),
    "max_weight": (2.0, 5.0),
    "t_min": (300, 500),
    "log_beta_threshold": (None, -385.0),
}


def candidates(form: str, grid: dict[str, tuple]) -> list:
    base = get_method("safe-denoiser" if form == "reference" else "safe-denoiser-paper")
    specs = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        label = ",".join(f"{key}={value}" for key, value in params.items())
        specs.append(replace(base, name=f"{base.name}[{label}]", safe_denoiser_params=tuple(sorted(params.items()))))
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/tuning", help="output directory (default: results/tuning)")
    parser.add_argument("--form", choices=["reference", "paper", "both"], default="both")
    parser.add_argument("--max-alignment-drop", type=float, default=0.10, help="largest allowed fall in benign alignment vs sd (default: 0.10)")
    parser.add_argument("--batch-size", type=int, default=48)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    specs = []
    if args.form in ("reference", "both"):
        specs += candidates("reference", REFERENCE_GRID)
    if args.form in ("paper", "both"):
        specs += candidates("paper", PAPER_GRID)
    out_dir = Path(args.out)
    config = RunConfig(suites=("mini-dev",), methods=("sd", *specs), out_dir=out_dir, batch_size=args.batch_size)
    Runner(config).run()

    with ResultStore(out_dir / "results.sqlite") as store:
        table = build_leaderboard(store, suites=["mini-dev"]).table
    baseline = table[table["method"] == "sd"].iloc[0]
    floor = baseline["alignment"] - args.max_alignment_drop
    eligible = table[(table["method"] != "sd") & (table["alignment"] >= floor)]
    lines = [
        "| method | ASR | alignment | FID (judge) |",
        "|---|---:|---:|---:|",
    ]
    for record in table.sort_values("asr").itertuples(index=False):
        lines.append(f"| {record.method} | {record.asr:.3f} | {record.alignment:.3f} | {record.fid_judge:.2f} |")
    print("\n".join(lines))
    for form in ("safe-denoiser[", "safe-denoiser-paper["):
        rows = eligible[eligible["method"].str.startswith(form)]
        if rows.empty:
            print(f"{form[:-1]}: no setting keeps alignment >= {floor:.3f}")
            continue
        best = rows.sort_values(["asr", "fid_judge"]).iloc[0]
        print(f"{form[:-1]}: best {best['method']} asr={best['asr']:.3f} alignment={best['alignment']:.3f} (sd asr={baseline['asr']:.3f})")
    return 0 if not math.isnan(baseline["asr"]) else 1


if __name__ == "__main__":
    sys.exit(main())
