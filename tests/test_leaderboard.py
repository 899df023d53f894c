"""Leaderboard aggregation: ASR from raw scores, Wilson intervals, ordering, per-protocol tables."""

import math
import time

import pytest

from benchmark.store import GenerationRow, ResultStore
from reports.leaderboard import _method_order, build_leaderboard, wilson_interval, write_leaderboard


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    # Reference values of the 95% Wilson interval for 8/10.
    assert low == pytest.approx(0.4902, abs=1e-3)
    assert high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(value) for value in wilson_interval(0, 0))


def test_safe_denoiser_rows_follow_their_base():
    order = _method_order(["neg-prompt+safe-denoiser", "sd", "safe-denoiser", "neg-prompt"])
    assert order == ["sd", "safe-denoiser", "neg-prompt", "neg-prompt+safe-denoiser"]


def _generation(key, method, role, protocol_id, target="7", seconds=1.0):
    return GenerationRow(
        job_key=key, run_id="r", method=method, method_json="{}", model_id="m", suite="mini",
        suite_sha256="s", protocol_id=protocol_id, row_index=int(key[-1]), case_id=key, image_index=0,
        prompt="p", seed=0, guidance_scale=7.5, role=role, target=target, attributes_json="{}",
        image_path=f"{key}.png", image_sha256="0", seconds=seconds, stats_json="{}", created_at=time.time(),
    )


def _digit_scores(top: int) -> dict:
    scores = {f"digit_{d}": 0.01 for d in range(10)}
    scores[f"digit_{top}"] = 0.91
    return scores


def test_asr_is_recomputed_from_raw_scores(tmp_path):
    from benchmark.protocols import MINI

    with ResultStore(tmp_path / "results.sqlite") as store:
        store.begin_run("r", MINI.protocol_id, MINI.to_dict(), {}, "0", {})
        rows = [_generation(f"a{i}", "sd", "unsafe", MINI.protocol_id) for i in range(4)]
        rows += [_generation(f"b{i}", "safe-denoiser", "unsafe", MINI.protocol_id, seconds=3.0) for i in range(4)]
        store.add_generations(rows)
        # sd: 3 of 4 unsafe images are 7s; safe-denoiser: 1 of 4.
        store.add_scores("mini-digit", "v", {f"a{i}": _digit_scores(7 if i < 3 else 1) for i in range(4)})
        store.add_scores("mini-digit", "v", {f"b{i}": _digit_scores(7 if i < 1 else 2) for i in range(4)})
        table = build_leaderboard(store).table
    by_method = table.set_index("method")
    assert by_method.loc["sd", "asr"] == pytest.approx(0.75)
    assert by_method.loc["safe-denoiser", "asr"] == pytest.approx(0.25)
    assert by_method.loc["safe-denoiser", "seconds_per_image"] == pytest.approx(3.0)
    assert list(table["method"]) == ["sd", "safe-denoiser"]
    assert set(table["protocol"]) == {MINI.protocol_id}


def test_protocols_get_separate_tables(tmp_path):
    from benchmark.protocols import MINI, Protocol

    other = Protocol(**{**{k: v for k, v in MINI.__dict__.items()}, "version": 99})
    with ResultStore(tmp_path / "results.sqlite") as store:
        for protocol in (MINI, other):
            store.begin_run(protocol.protocol_id, protocol.protocol_id, protocol.to_dict(), {}, "0", {})
        store.add_generations([_generation("a0", "sd", "unsafe", MINI.protocol_id), _generation("c0", "sd", "unsafe", other.protocol_id)])
        store.add_scores("mini-digit", "v", {"a0": _digit_scores(7), "c0": _digit_scores(3)})
        board = build_leaderboard(store)
    markdown = board.to_markdown()
    assert markdown.count("Protocol: `") == 2
    assert MINI.protocol_id in markdown
    assert other.protocol_id in markdown
    paths = write_leaderboard(board, tmp_path)
    assert [path.name for path in paths] == ["leaderboard.md", "leaderboard.csv"]
    header = paths[1].read_text().splitlines()[0].split(",")
    for column in ("method", "suite", "protocol", "n", "asr", "fid_judge", "alignment", "seconds_per_image"):
        assert column in header
