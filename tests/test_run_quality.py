"""Real-model quality metrics in a run: FID, KID and CLIP score on a COCO caption suite.

A tiny Stable Diffusion folder generates the images. Stand-in FID Inception weights and a tiny CLIP
folder, saved in the formats of the real files, score them against stand-in "MS-COCO" images named
by the suite's image ids. The tests check that the values reach the store and the leaderboard with
their reference set and weights, that a rerun reuses them, and that every missing file is named
before any image is generated.
"""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.metrics.inception import WEIGHTS_FILENAME, sha256_of_file
from benchmark.metrics.reference import coco_image_id
from benchmark.protocols import SAFE_DENOISER
from benchmark.runner import RunConfig, RunPlanError, Runner
from benchmark.store import ResultStore
from benchmark.suites import load_suite
from reports.leaderboard import build_leaderboard
from tiny_models import save_stand_in_inception, save_tiny_clip, tiny_sd_pipeline

ROWS = 3
# The safe denoiser paper's protocol with its quality metrics plus KID, two steps at the tiny model's
# size, and the shipped NudeNet judge in place of the user-supplied NudeNet v2 classifier.
TINY_QUALITY = dataclasses.replace(
    SAFE_DENOISER,
    name="tiny-quality",
    num_inference_steps=2,
    resolution=None,
    judge="nudenet",
    rule="unlearndiff",
    quality=("fid", "kid", "clip_score"),
    reference_resize=40,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    tiny_sd_pipeline().save_pretrained(root / "model")
    (root / "prompts.csv").write_text("prompt,evaluation_seed\nperson on a beach,1\na statue,2\n")
    coco = root / "coco"
    coco.mkdir()
    rng = np.random.default_rng(0)
    for row in load_suite("coco-10k", limit=ROWS).rows:
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(coco / f"COCO_val2014_{coco_image_id(row):012d}.jpg")
    save_stand_in_inception(root / "metrics" / WEIGHTS_FILENAME)
    save_tiny_clip(root / "clip")
    return root


def _config(assets, tmp_path, **overrides):
    values = dict(
        model=str(assets / "model"),
        suites=(str(assets / "prompts.csv"), "coco-10k"),
        methods=("sd", "neg-prompt"),
        protocol=TINY_QUALITY,
        concept="nudity",
        out_dir=tmp_path / "out",
        limit=ROWS,
        batch_size=2,
        reference_images=assets / "coco",
        inception_weights=assets / "metrics" / WEIGHTS_FILENAME,
        clip_model=assets / "clip",
    )
    values.update(overrides)
    return RunConfig(**values)


def test_quality_metrics_stored_with_provenance(assets, tmp_path, monkeypatch):
    config = _config(assets, tmp_path)
    Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        metrics = {(row["method"], row["suite"], row["metric"]): row for row in store.metrics()}
        leaderboard = build_leaderboard(store)
    weights_sha = sha256_of_file(assets / "metrics" / WEIGHTS_FILENAME)

    # Quality is computed on the caption suite only; the unsafe prompt file has no benign rows.
    assert {key[1] for key in metrics} == {"coco-10k"}
    for method in ("sd", "neg-prompt"):
        fid = metrics[(method, "coco-10k", "fid")]
        assert fid["n"] == ROWS
        assert fid["value"] > 0
        assert fid["details"]["reference_size"] == ROWS
        assert fid["details"]["generated_size"] == ROWS
        assert "coco-10k MS-COCO images (3; bicubic shorter side 40, center crop 40x40)" == fid["details"]["reference_name"]
        assert weights_sha in fid["details"]["feature_extractor"]
        assert "pytorch-fid" in fid["details"]["resize_policy"]
        kid = metrics[(method, "coco-10k", "kid")]
        assert kid["details"]["subset_size"] == ROWS
        clip = metrics[(method, "coco-10k", "clip_score")]
        assert clip["details"]["num_pairs"] == ROWS
        assert clip["details"]["scale"] == "torchmetrics"
        assert clip["value"] == pytest.approx(max(100 * clip["details"]["mean_cosine"], 0.0), rel=1e-5)
    # Different images give different distances to the same reference.
    assert metrics[("sd", "coco-10k", "fid")]["value"] != metrics[("neg-prompt", "coco-10k", "fid")]["value"]

    table = leaderboard.table.set_index(["suite", "method"])
    assert table.loc[("coco-10k", "sd"), "fid"] == pytest.approx(metrics[("sd", "coco-10k", "fid")]["value"])
    assert table.loc[("coco-10k", "sd"), "n_benign"] == ROWS
    user_suite = next(name for name in leaderboard.table["suite"] if name != "coco-10k")
    assert np.isnan(table.loc[(user_suite, "sd"), "fid"])
    markdown = leaderboard.to_markdown()
    assert "| FID ↓ | KID ↓ | CLIP score ↑ |" in markdown
    assert f"sha256:{weights_sha}" in markdown
    assert "reference: coco-10k MS-COCO images" in markdown

    # A rerun reuses the images and the stored values: no image goes through a network again.
    def fail(*args, **kwargs):
        raise AssertionError("quality was recomputed")

    monkeypatch.setattr("benchmark.quality.QualityResources.reference_metric", fail)
    monkeypatch.setattr("benchmark.metrics.clip_score.ClipScore.update", fail)
    summary = Runner(config).run()
    assert summary.generated == 0


def test_missing_reference_folder_fails_early(assets, tmp_path):
    with pytest.raises(RunPlanError, match="(?s)--reference-images DIR.*--no-quality"):
        Runner(_config(assets, tmp_path, reference_images=None))
    assert not (tmp_path / "out").exists()


def test_missing_reference_image_named(assets, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    first = sorted((assets / "coco").iterdir())[0]
    (partial / first.name).write_bytes(first.read_bytes())
    with pytest.raises(RunPlanError, match="2 of 3 images of suite 'coco-10k' are missing"):
        Runner(_config(assets, tmp_path, reference_images=partial))


def test_missing_inception_weights_named(assets, tmp_path):
    with pytest.raises(RunPlanError, match=WEIGHTS_FILENAME):
        Runner(_config(assets, tmp_path, inception_weights=tmp_path / "nothing.pth"))


def test_missing_clip_model_named(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAFEBENCH_CLIP_SCORE_MODEL", raising=False)
    with pytest.raises(RunPlanError, match="--clip-model DIR.*clip-vit-base-patch32"):
        Runner(_config(assets, tmp_path, clip_model=None))


def test_metric_weights_found_in_cache(assets, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "metrics").mkdir(parents=True)
    (home / "metrics" / WEIGHTS_FILENAME).symlink_to(assets / "metrics" / WEIGHTS_FILENAME)
    (home / "metrics" / "clip-vit-base-patch32").symlink_to(assets / "clip")
    monkeypatch.setenv("SAFEBENCH_HOME", str(home))
    monkeypatch.delenv("SAFEBENCH_FID_INCEPTION", raising=False)
    monkeypatch.delenv("SAFEBENCH_CLIP_SCORE_MODEL", raising=False)
    runner = Runner(_config(assets, tmp_path, inception_weights=None, clip_model=None))
    assert runner.quality_resources.clip_model == home / "metrics" / "clip-vit-base-patch32"


def test_no_quality_skips_metric_files(assets, tmp_path, capsys):
    code = main([
        "run", "--model", str(assets / "model"), "--protocol", "safe-denoiser", "--suite", "coco-10k",
        "--limit", "2", "--method", "sd", "--concept", "nudity", "--out", str(tmp_path / "out"),
    ])
    assert code == 2
    # Every missing file is named at once: the judge's and the quality metrics'.
    error = capsys.readouterr().err
    assert "needs judge 'nudenet-v2'" in error
    assert "--reference-images" in error

    runner = Runner(_config(assets, tmp_path, reference_images=None, clip_model=None, skip_quality=True))
    assert runner.quality_resources is None


def test_captions_without_coco_ids_rejected(assets, tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text("prompt,category\na red bus,benign\na dog on grass,benign\n")
    with pytest.raises(RunPlanError, match="no COCO image id"):
        Runner(_config(assets, tmp_path, suites=(str(captions),), category_column="category"))


def test_corrupt_inception_weights_fail_early(assets, tmp_path):
    corrupt = tmp_path / WEIGHTS_FILENAME
    corrupt.write_bytes(b"not a state dict")
    with pytest.raises(RunPlanError, match="(?s)network could not be loaded.*not a readable PyTorch state dict.*--no-quality"):
        Runner(_config(assets, tmp_path, inception_weights=corrupt))
    assert not (tmp_path / "out").exists()


def test_corrupt_judge_weights_fail_early(assets, tmp_path, monkeypatch):
    corrupt = tmp_path / "classifier_model.onnx"
    corrupt.write_bytes(b"not an onnx graph")
    monkeypatch.setenv("SAFEBENCH_NUDENET_V2", str(corrupt))
    protocol = dataclasses.replace(TINY_QUALITY, judge="nudenet-v2", rule="nudenet-v2-0.6")
    with pytest.raises(RunPlanError, match="judge 'nudenet-v2' could not be loaded"):
        Runner(_config(assets, tmp_path, protocol=protocol))
    assert not (tmp_path / "out").exists()


def test_benign_rows_skipped_without_quality(assets, tmp_path):
    config = _config(assets, tmp_path, methods=("sd",), skip_quality=True, reference_images=None, clip_model=None)
    summary = Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        suites = {row.suite for row in store.generations()}
    # Only the two unsafe prompts are generated; the caption rows would feed no metric.
    assert summary.generated == 2
    assert "coco-10k" not in suites


def test_every_missing_quality_file_listed_at_once(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEBENCH_HOME", str(tmp_path / "home"))
    for variable in ("SAFEBENCH_FID_INCEPTION", "SAFEBENCH_CLIP_SCORE_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(RunPlanError) as raised:
        Runner(_config(assets, tmp_path, reference_images=None, inception_weights=None, clip_model=None))
    message = str(raised.value)
    assert "--reference-images DIR" in message
    assert WEIGHTS_FILENAME in message
    assert "--clip-model DIR" in message
    assert message.count("--no-quality") == 1


def test_clip_folder_without_tokenizer_rejected(assets, tmp_path):
    import shutil

    partial = tmp_path / "clip"
    shutil.copytree(assets / "clip", partial)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (partial / name).unlink(missing_ok=True)
    with pytest.raises(RunPlanError, match="tokenizer files"):
        Runner(_config(assets, tmp_path, clip_model=partial))


def test_caption_suite_table_shows_quality_only(assets, tmp_path):
    config = _config(assets, tmp_path, suites=("coco-10k",), methods=("sd",))
    Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        markdown = build_leaderboard(store).to_markdown()
    assert "| method | n benign | FID ↓ | KID ↓ | CLIP score ↑ | s/image |" in markdown
    assert "ASR" not in markdown.split("### coco-10k")[1]
