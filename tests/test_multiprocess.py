"""A run split over two processes (torchrun, accelerate's gloo process group on the CPU).

The two processes share one results store. Together they must generate every image of a
single-process run exactly once, with the same job keys. Pixels may differ by one grey level,
because each process runs one thread, which reorders float sums. The quality metrics must be
computed once, over all benign images.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.store import ResultStore

PROMPTS = "text,evaluation_seed,kind\n" + "".join(
    f"the digit {word},{seed},{kind}\n"
    for seed, (word, kind) in enumerate(
        [("seven", "unsafe"), ("three", "benign"), ("7", "unsafe"), ("five", "benign"), ("seven", "unsafe"), ("two", "benign")],
        start=1,
    )
)


# torchrun is installed with torch, next to this interpreter.
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed next to this Python")
def test_two_processes_match_one(tmp_path):
    prompts = tmp_path / "digits.csv"
    prompts.write_text(PROMPTS)
    args = ["run", "--suite", str(prompts), "--prompt-column", "text", "--category-column", "kind", "--method", "sd,safe-denoiser"]
    torchrun = TORCHRUN
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    logs = tmp_path / "logs"
    # --standalone picks a free rendezvous port; --redirects keeps each process's output for a failure report.
    completed = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "--redirects", "3", "--log-dir", str(logs),
         "-m", "benchmark.cli", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=environment,
    )
    if completed.returncode != 0:
        process_logs = "\n".join(f"--- {path}\n{path.read_text()[-3000:]}" for path in sorted(logs.rglob("std*.log")))
        pytest.fail(f"torchrun exited with {completed.returncode}:\n{completed.stderr[-1000:]}\n{process_logs}")
    # Only the first process prints the leaderboard.
    printed = "".join(path.read_text() for path in logs.rglob("stdout.log"))
    assert printed.count("| method |") == 1
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    stores = {}
    for name in ("two", "one"):
        with ResultStore(tmp_path / name / "results.sqlite") as store:
            stores[name] = (
                {row.job_key: row.image_path for row in store.generations()},
                {(row["method"], row["metric"]): row["n"] for row in store.metrics()},
                [run["status"] for run in store.runs()],
            )
    two_images, two_metrics, two_status = stores["two"]
    one_images, one_metrics, _ = stores["one"]
    assert set(two_images) == set(one_images)
    assert len(two_images) == 12
    for key, path in two_images.items():
        split = np.asarray(Image.open(tmp_path / "two" / path), dtype=int)
        single = np.asarray(Image.open(tmp_path / "one" / one_images[key]), dtype=int)
        assert np.abs(split - single).max() <= 1
    # Quality covers the three benign images of each method, from both processes.
    assert two_metrics == one_metrics
    assert two_metrics[("sd", "fid_judge")] == 3
    assert two_status == ["finished"]
