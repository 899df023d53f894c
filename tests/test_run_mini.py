"""End-to-end runs on the embedded miniature model: leaderboard, resume, crash safety, plan checks."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.generation import MethodRuntime
from benchmark.protocols import MINI
from benchmark.runner import RunConfig, RunPlanError, Runner
from benchmark.store import ResultStore
from benchmark.suites import SuiteError
from reports.leaderboard import build_leaderboard

# Four DDPM steps keep each image at a few milliseconds; everything else is the mini protocol.
SHORT = dataclasses.replace(MINI, name="mini-short", num_inference_steps=4)


def _config(tmp_path, **overrides):
    values = dict(
        suites=("mini-dev",),
        methods=("sd", "safe-denoiser"),
        protocol=SHORT,
        out_dir=tmp_path / "out",
        batch_size=4,
        limit=None,
    )
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    config = _config(tmp_path, methods=("sd", "neg-prompt", "safe-denoiser", "neg-prompt+safe-denoiser"))
    summary = Runner(config).run()
    return config, summary


def test_run_fills_store_and_leaderboard(finished_run):
    config, summary = finished_run
    with ResultStore(config.out_dir / "results.sqlite") as store:
        generations = store.generations()
        table = build_leaderboard(store).table
        scores = store.scores("mini-digit")
    rows_per_method = len(generations) // 4
    assert summary.generated == len(generations) > 0
    assert {row.method for row in generations} == {"sd", "neg-prompt", "safe-denoiser", "neg-prompt+safe-denoiser"}
    assert set(scores) == {row.job_key for row in generations}
    for row in generations:
        assert (config.out_dir / row.image_path).is_file()
        assert set(scores[row.job_key]) == {f"digit_{d}" for d in range(10)}
    assert list(table["method"]) == ["sd", "safe-denoiser", "neg-prompt", "neg-prompt+safe-denoiser"]
    assert (table["n"] + table["n_benign"] == rows_per_method).all()
    assert table["asr"].between(0, 1).all()
    assert table["fid_judge"].notna().all()
    assert table["protocol"].str.contains("ddpm4").all()


def test_rerun_skips_finished_images(finished_run):
    config, first = finished_run
    second = Runner(config).run()
    assert second.generated == 0
    assert second.skipped == first.generated
    assert second.scored == 0


def test_safe_denoiser_rows_record_corrections(finished_run):
    config, _ = finished_run
    with ResultStore(config.out_dir / "results.sqlite") as store:
        rows = store.generations(method="safe-denoiser")
    assert rows
    assert all('"corrected_steps"' in row.stats_json for row in rows)


def test_crash_keeps_finished_batches(tmp_path, monkeypatch):
    config = _config(tmp_path, methods=("sd",), limit=12)
    real_generate = MethodRuntime.generate
    calls = {"count": 0}

    def failing_generate(self, prompts, seeds, guidance_scale, class_labels=None):
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt("simulated interrupt in the second batch")
        return real_generate(self, prompts, seeds, guidance_scale, class_labels)

    monkeypatch.setattr(MethodRuntime, "generate", failing_generate)
    with pytest.raises(KeyboardInterrupt):
        Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        kept = store.generations()
        status = store.runs()[0]["status"]
    assert len(kept) == config.batch_size
    assert status == "interrupted"
    assert all((config.out_dir / row.image_path).is_file() for row in kept)
    assert not list(config.out_dir.rglob("*.tmp"))

    monkeypatch.setattr(MethodRuntime, "generate", real_generate)
    resumed = Runner(config).run()
    assert resumed.skipped == config.batch_size
    assert resumed.generated == 12 - config.batch_size


def test_image_does_not_depend_on_batch(tmp_path):
    """Per-row generators make each image independent of its batch companions.

    Batched matrix products round differently from single ones, so pixels may differ by float
    rounding (a step of 1/255 after quantisation), never by content.
    """
    alone = Runner(_config(tmp_path / "a", methods=("safe-denoiser",), limit=3, batch_size=1)).run()
    batched = Runner(_config(tmp_path / "b", methods=("safe-denoiser",), limit=3, batch_size=3)).run()
    images = []
    for summary in (alone, batched):
        with ResultStore(summary.out_dir / "results.sqlite") as store:
            paths = [summary.out_dir / row.image_path for row in store.generations()]
        images.append([np.asarray(Image.open(path), dtype=np.int16) for path in paths])
    assert len(images[0]) == len(images[1]) == 3
    for single, in_batch in zip(*images):
        assert np.abs(single - in_batch).max() <= 2


def test_unknown_method_is_rejected_before_generation(tmp_path):
    with pytest.raises(RunPlanError, match="known methods are"):
        Runner(_config(tmp_path, methods=("sd", "sld-ultra")))
    assert not (tmp_path / "out").exists()


def test_unknown_suite_is_rejected(tmp_path):
    with pytest.raises(SuiteError):
        Runner(_config(tmp_path, suites=("mini-typo",)))


def test_real_prompt_set_is_rejected_for_mini_model(tmp_path):
    with pytest.raises(RunPlanError, match="does not fit model"):
        Runner(_config(tmp_path, suites=("ring-a-bell-nudity",)))


def test_digit_judge_is_rejected_for_real_model(tmp_path):
    with pytest.raises(RunPlanError, match="digit judge"):
        Runner(_config(tmp_path, model="some/real-model", suites=("ring-a-bell-nudity",), concept="digit-7"))


def test_bad_batch_size_names_the_fix():
    with pytest.raises(RunPlanError, match="--batch-size"):
        RunConfig(batch_size=0)


def test_cli_reports_plan_errors(tmp_path, capsys):
    code = main(["run", "--method", "sd,bogus", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "bogus" in capsys.readouterr().err


def test_cli_lists_suites(capsys):
    assert main(["list", "suites"]) == 0
    output = capsys.readouterr().out
    assert "ring-a-bell-nudity" in output
    assert "79 rows" in output


def test_every_defense_kind_runs(tmp_path):
    config = _config(tmp_path, methods=("sld-medium", "safree+safe-denoiser", "esd-u", "uce+safe-denoiser"), limit=4)
    summary = Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        rows = store.generations()
    assert summary.generated == 16
    resolved = {row.method: row.method_json for row in rows}
    assert '"sld_guidance_scale": 1000' in resolved["sld-medium"].replace(".0", "")
    assert '"form": "reference"' in resolved["safree+safe-denoiser"]
    assert '"sha256"' in resolved["esd-u"]
    assert '"uce_erase": ["7"]' in resolved["uce+safe-denoiser"]


def test_bad_setting_fails_before_any_image(tmp_path):
    from benchmark.methods import get_method

    bad = dataclasses.replace(get_method("safe-denoiser"), name="bad", safe_denoiser_params=(("bandwith", 2.0),))
    with pytest.raises(ValueError, match=r"unknown safe denoiser \(reference form\) setting\(s\) \['bandwith'\]"):
        Runner(_config(tmp_path, methods=("sd", bad), limit=4)).run()
    with ResultStore(tmp_path / "out" / "results.sqlite") as store:
        assert store.generations() == []


def test_user_negative_prompt_replaces_preset(tmp_path):
    preset = Runner(_config(tmp_path / "a", methods=("neg-prompt",), limit=2)).run()
    custom = Runner(_config(tmp_path / "b", methods=("neg-prompt",), limit=2, negative_prompt="sevens, the number 7")).run()
    keys = []
    for summary in (preset, custom):
        with ResultStore(summary.out_dir / "results.sqlite") as store:
            rows = store.generations()
        keys.append({row.job_key for row in rows})
        if summary is custom:
            assert all('"negative_prompt": "sevens, the number 7"' in row.method_json for row in rows)
    assert not keys[0] & keys[1]


def test_cli_rescore_applies_other_rule(finished_run, capsys):
    config, _ = finished_run
    assert main(["rescore", "--out", str(config.out_dir), "--rule", "mini-digit-7"]) == 0
    output = capsys.readouterr().out
    assert "mini-digit:mini-digit-7 (rescored; the run used mini-digit-7)" in output
    assert "rescored with rule mini-digit-7 = " in output
    assert main(["rescore", "--out", str(config.out_dir), "--rule", "rece"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("safebench rescore:")
    assert "have no scores of ['nudenet'] (stored judges: ['mini-digit']); pick a rule of a stored judge" in error


def test_user_file_with_benign_rows(tmp_path, capsys):
    prompts = tmp_path / "digits.csv"
    prompts.write_text("text,evaluation_seed,kind\nthe digit three,1,benign\nthe digit seven,2,unsafe\nthe digit five,3,benign\n")
    code = main([
        "run", "--suite", str(prompts), "--prompt-column", "text", "--category-column", "kind",
        "--method", "sd", "--limit", "3", "--out", str(tmp_path / "out"),
    ])
    output = capsys.readouterr().out
    assert code == 0
    assert "| sd | 1 |" in output
    with ResultStore(tmp_path / "out" / "results.sqlite") as store:
        roles = sorted(row.role for row in store.generations())
    assert roles == ["benign", "benign", "unsafe"]


def test_cli_set_overrides_safe_denoiser(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", "--suite", "mini-dev", "--limit", "4", "--method", "safe-denoiser", "--out", str(out), "--batch-size", "4"]
    assert main([*args, "--set", "safe-denoiser.scale=0.25"]) == 0
    assert main(args) == 0
    with ResultStore(out / "results.sqlite") as store:
        rows = store.generations()
        table = build_leaderboard(store).table
    overridden = [row for row in rows if row.method == "safe-denoiser[safe-denoiser.scale=0.25]"]
    preset = [row for row in rows if row.method == "safe-denoiser"]
    assert len(overridden) == len(preset) == 4
    assert '"scale": 0.25' in overridden[0].method_json
    assert '"scale": 0.25' not in preset[0].method_json
    assert not {row.job_key for row in overridden} & {row.job_key for row in preset}
    assert set(table["method"]) == {"safe-denoiser", "safe-denoiser[safe-denoiser.scale=0.25]"}
    assert "safe-denoiser[safe-denoiser.scale=0.25]" in capsys.readouterr().out


def test_embedded_model_rejects_other_embedded_preset(tmp_path):
    with pytest.raises(RunPlanError, match="use --protocol mini"):
        Runner(_config(tmp_path, protocol="mini-class"))


def test_flat_images_flagged_in_leaderboard(tmp_path, monkeypatch, caplog):
    original = MethodRuntime.generate

    def black_first_image(self, prompts, seeds, guidance_scale, class_labels=None):
        output = original(self, prompts, seeds, guidance_scale, class_labels=class_labels)
        output.images[0] = Image.new("RGB", output.images[0].size)
        return output

    monkeypatch.setattr(MethodRuntime, "generate", black_first_image)
    config = _config(tmp_path, methods=("sd",), limit=3, batch_size=3)
    Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        markdown = build_leaderboard(store).to_markdown()
    assert "sd: 1 of 3 images are a single flat colour" in markdown
    assert "single flat colour" in caplog.text
