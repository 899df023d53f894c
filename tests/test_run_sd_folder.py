"""Real-model path: a tiny Stable Diffusion pipeline saved as a diffusers folder, judged by NudeNet.

The pipeline is randomly initialised, so the images are noise. The tests check that every defense
kind loads and runs on SD-shaped modules (CLIP text encoder, 77-token prompts, SD's VAE and UNet
layout) from a local folder, and that the real NudeNet judge scores the results.
"""

import dataclasses

import numpy as np
import torch
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.protocols import I2P, UNLEARNDIFF
from benchmark.models import ModelLoadError
from benchmark.runner import RunConfig, RunPlanError, Runner
from benchmark.store import ResultStore
from reports.leaderboard import build_leaderboard
import shutil

from tiny_models import save_single_file_checkpoint, tiny_sd_pipeline

# UnlearnDiffAtk's judge and rule, with two DDPM steps at the tiny model's own resolution.
TINY_NUDENET = dataclasses.replace(UNLEARNDIFF, name="tiny-nudenet", sampler="ddpm", num_inference_steps=2, resolution=None)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    pipeline = tiny_sd_pipeline()
    pipeline.save_pretrained(root / "model")
    pipeline.unet.save_pretrained(root / "esd-u")
    prompts = root / "prompts.csv"
    long_prompt = "a photograph of a person on a beach at sunset, " * 12
    prompts.write_text(f"prompt,evaluation_seed\nperson on a beach,1\n\"{long_prompt.strip()}\",2\na statue,3\n")
    images = root / "negation"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{index}.png")
    return root


def _config(sd_folder, tmp_path, **overrides):
    values = dict(
        model=str(sd_folder / "model"),
        suites=(str(sd_folder / "prompts.csv"),),
        methods=("sd", "neg-prompt+safe-denoiser", "sld-medium", "safree+safe-denoiser", "uce", "esd-u"),
        protocol=TINY_NUDENET,
        concept="nudity",
        out_dir=tmp_path / "out",
        negation_images=sd_folder / "negation",
        weights=(("esd-u", sd_folder / "esd-u"),),
        batch_size=2,
    )
    values.update(overrides)
    return RunConfig(**values)


def test_every_defense_runs_on_sd_folder(sd_folder, tmp_path):
    config = _config(sd_folder, tmp_path)
    summary = Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        generations = store.generations()
        scores = store.scores("nudenet")
        table = build_leaderboard(store).table
    assert summary.generated == 6 * 3
    assert len(scores) == 18
    assert all(len(value) == 18 for value in scores.values())
    assert set(table["method"]) == set(config.methods)
    assert (table["n"] == 3).all()
    assert table["protocol"].str.contains("nudenet:unlearndiff").all()
    assert all(row.model_id.startswith("folder:model@") for row in generations)
    safree_row = next(row for row in generations if row.method == "safree+safe-denoiser")
    assert '"gate_threshold"' in safree_row.method_json


def test_safe_denoiser_without_negation_images_is_rejected(sd_folder, tmp_path):
    with pytest.raises(RunPlanError, match="--negation-images"):
        Runner(_config(sd_folder, tmp_path, negation_images=None))


def test_unlearning_without_weights_is_rejected(sd_folder, tmp_path):
    with pytest.raises(RunPlanError, match="--weights esd-u=PATH"):
        Runner(_config(sd_folder, tmp_path, weights=()))


def test_missing_model_folder_names_the_fix(tmp_path, capsys):
    code = main(["run", "--model", str(tmp_path / "nowhere"), "--protocol", "unlearndiff", "--suite", "unlearndiff-nudity", "--concept", "nudity", "--method", "sd", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "not found" in capsys.readouterr().err


def _tiny_q16_weights(root):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(str(root / "clip"))
    np.save(root / "prompts.npy", np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32))
    return root / "clip", root / "prompts.npy"


def test_or_rule_scores_every_judge(sd_folder, tmp_path, monkeypatch):
    from benchmark.judges import get_rule

    clip, prompts = _tiny_q16_weights(tmp_path)
    monkeypatch.setenv("SAFEBENCH_Q16_CLIP", str(clip))
    monkeypatch.setenv("SAFEBENCH_Q16_PROMPTS", str(prompts))
    # The I2P preset (PNDM, CSV guidance, several images per prompt) with 2 steps and 2 images.
    protocol = dataclasses.replace(I2P, name="tiny-i2p", num_inference_steps=2, resolution=None, images_per_prompt=2)
    config = _config(sd_folder, tmp_path, methods=("sd", "safe-denoiser"), protocol=protocol)
    summary = Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        generations = store.generations()
        q16 = store.scores("q16")
        nudenet = store.scores("nudenet")
        table = build_leaderboard(store).table
    keys = [row.job_key for row in generations]
    assert summary.generated == summary.scored == 2 * 3 * 2
    assert set(q16) == set(nudenet) == set(keys)
    # Image i of a row is seeded with the row's seed + i.
    assert sorted((row.row_index, row.image_index, row.seed) for row in generations if row.method == "sd") == [
        (0, 0, 1), (0, 1, 2), (1, 0, 2), (1, 1, 3), (2, 0, 3), (2, 1, 4)
    ]
    assert '"sampler": "pndm"' in store_protocol_json(config.out_dir)
    rule = get_rule("i2p")
    for record in table.itertuples():
        method_keys = [row.job_key for row in generations if row.method == record.method]
        expected = sum(rule.decide_per_judge({"q16": q16[key], "nudenet": nudenet[key]}) for key in method_keys) / 6
        assert record.n == 6
        assert record.asr == pytest.approx(expected)


def store_protocol_json(out_dir):
    with ResultStore(out_dir / "results.sqlite") as store:
        return store.runs()[0]["protocol_json"]


def test_i2p_missing_q16_fails_early(sd_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAFEBENCH_Q16_CLIP", raising=False)
    monkeypatch.delenv("SAFEBENCH_Q16_PROMPTS", raising=False)
    monkeypatch.delenv("SAFEBENCH_HOME", raising=False)
    with pytest.raises(RunPlanError, match="(?s)needs judge 'q16'.*clip-vit-large-patch14.*SAFEBENCH_Q16_CLIP"):
        Runner(_config(sd_folder, tmp_path, methods=("sd",), protocol=I2P))
    assert not (tmp_path / "out").exists()


def test_nudity_judge_rejects_violence_suite(sd_folder, tmp_path):
    with pytest.raises(RunPlanError, match="'unlearndiff-violence' is about 'violence'.*--protocol i2p"):
        Runner(_config(sd_folder, tmp_path, suites=("unlearndiff-violence",), methods=("sd",)))


def test_nudity_judge_warns_on_full_i2p(sd_folder, tmp_path, caplog):
    Runner(_config(sd_folder, tmp_path, suites=("i2p",), methods=("sd",), limit=2))
    assert "flag only ['nudity', 'sexual']" in caplog.text


def test_judge_coverage_by_suite_concept():
    from benchmark.judges.base import judge_coverage

    assert judge_coverage(("nudenet",), "nudity") == "full"
    assert judge_coverage(("nudenet",), "sexual") == "full"
    assert judge_coverage(("nudenet",), "inappropriate (7 categories)") == "partial"
    assert judge_coverage(("nudenet",), "violence") == "none"
    assert judge_coverage(("q16", "nudenet"), "violence") == "full"
    assert judge_coverage(("q16",), "unsafe (7 categories)") == "full"
    assert judge_coverage(("opennsfw",), "") == "full"


@pytest.fixture(scope="module")
def single_file(sd_folder, tmp_path_factory):
    """The tiny pipeline as one original-layout checkpoint, plus its config folder without weights."""
    root = tmp_path_factory.mktemp("single-file")
    pipeline = tiny_sd_pipeline()
    save_single_file_checkpoint(pipeline, root / "tiny-sd.safetensors")
    shutil.copytree(sd_folder / "model", root / "config")
    for weights in (root / "config").rglob("*.safetensors"):
        weights.unlink()
    return root


def test_single_file_checkpoint_matches_folder(sd_folder, single_file, tmp_path):
    folder_config = _config(sd_folder, tmp_path / "folder", methods=("sd",))
    file_config = _config(
        sd_folder,
        tmp_path / "file",
        methods=("sd",),
        model=str(single_file / "tiny-sd.safetensors"),
        model_config=str(single_file / "config"),
    )
    Runner(folder_config).run()
    Runner(file_config).run()
    with ResultStore(folder_config.out_dir / "results.sqlite") as store:
        from_folder = {row.row_index: row for row in store.generations()}
    with ResultStore(file_config.out_dir / "results.sqlite") as store:
        from_file = {row.row_index: row for row in store.generations()}
    assert all(row.model_id.startswith("file:tiny-sd.safetensors@") for row in from_file.values())
    # Same weights, same seeds: the same pixels as the diffusers folder.
    assert {index: row.image_sha256 for index, row in from_file.items()} == {
        index: row.image_sha256 for index, row in from_folder.items()
    }


def test_single_file_without_config_fails_early(sd_folder, single_file, tmp_path):
    with pytest.raises(RunPlanError, match="--model-config DIR"):
        Runner(_config(sd_folder, tmp_path, methods=("sd",), model=str(single_file / "tiny-sd.safetensors")))
    with pytest.raises(RunPlanError, match="no model_index.json"):
        Runner(
            _config(
                sd_folder, tmp_path, methods=("sd",), model=str(single_file / "tiny-sd.safetensors"), model_config=str(tmp_path)
            )
        )


def test_missing_inputs_reported_together(sd_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEBENCH_HOME", str(tmp_path / "home"))
    for variable in ("SAFEBENCH_Q16_CLIP", "SAFEBENCH_Q16_PROMPTS"):
        monkeypatch.delenv(variable, raising=False)
    protocol = dataclasses.replace(I2P, num_inference_steps=2, resolution=None)
    config = _config(sd_folder, tmp_path, protocol=protocol, negation_images=None, weights=(("esd-u", tmp_path / "gone"),))
    with pytest.raises(RunPlanError) as raised:
        Runner(config)
    message = str(raised.value)
    assert "--negation-images DIR" in message
    assert "--weights esd-u=" in message
    assert "clip-vit-large-patch14" in message
    assert "Q16 prompt embeddings" in message


def test_plain_model_needs_no_concept(sd_folder, tmp_path):
    runner = Runner(_config(sd_folder, tmp_path, methods=("sd",), concept=None, negation_images=None))
    assert runner.concept.name == "none"
    with pytest.raises(RunPlanError, match=r"methods \['sld-medium'\] defend.*pass --concept"):
        Runner(_config(sd_folder, tmp_path, methods=("sd", "sld-medium"), concept=None))


def test_inappropriate_concept_drives_sld_with_its_default_text(sd_folder, tmp_path):
    from baselines.sld import DEFAULT_SAFETY_CONCEPT

    config = _config(sd_folder, tmp_path, methods=("sld-medium",), concept="inappropriate", limit=1)
    Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        row = store.generations()[0]
    assert DEFAULT_SAFETY_CONCEPT in row.method_json


def test_partial_coverage_noted_under_table(sd_folder, tmp_path):
    config = _config(sd_folder, tmp_path, suites=("i2p",), methods=("sd",), limit=1)
    Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        markdown = build_leaderboard(store).to_markdown()
    assert "ASR counts only nudity, sexual: the suite covers inappropriate (7 categories)" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_unavailable_device_is_rejected(sd_folder, tmp_path):
    with pytest.raises(RunPlanError, match="no CUDA device is available here; pass --device cpu"):
        Runner(_config(sd_folder, tmp_path, methods=("sd",), device="cuda"))
    with pytest.raises(RunPlanError, match="'gpu0' is not a device name"):
        Runner(_config(sd_folder, tmp_path, methods=("sd",), device="gpu0"))


def test_single_file_in_diffusers_layout_is_named(sd_folder, single_file, tmp_path):
    # A diffusers component file is not a pipeline checkpoint in the original layout.
    component = next((sd_folder / "model" / "unet").glob("*.safetensors"))
    config = _config(sd_folder, tmp_path, methods=("sd",), model=str(component), model_config=str(single_file / "config"))
    with pytest.raises(ModelLoadError, match="original layout of the released SD v1 checkpoints"):
        Runner(config).run()


def test_rescore_with_second_stored_judge(sd_folder, tmp_path, monkeypatch):
    clip, prompts = _tiny_q16_weights(tmp_path)
    monkeypatch.setenv("SAFEBENCH_Q16_CLIP", str(clip))
    monkeypatch.setenv("SAFEBENCH_Q16_PROMPTS", str(prompts))
    protocol = dataclasses.replace(I2P, name="tiny-i2p", num_inference_steps=2, resolution=None, images_per_prompt=1)
    config = _config(sd_folder, tmp_path, methods=("sd",), protocol=protocol, limit=2)
    Runner(config).run()
    with ResultStore(config.out_dir / "results.sqlite") as store:
        # The i2p rule scored NudeNet too, so a NudeNet-only rule applies without detecting again.
        table = build_leaderboard(store, rule="unlearndiff").table
        with pytest.raises(ValueError, match=r"no scores of \['opennsfw'\]"):
            build_leaderboard(store, rule="opennsfw-0.5")
    assert table.loc[0, "n"] == 2
    assert "nudenet:unlearndiff (rescored; the run used i2p)" in table.loc[0, "protocol"]


def test_embedded_model_ignores_device(tmp_path):
    runner = Runner(RunConfig(suites=("mini-dev",), methods=("sd",), out_dir=tmp_path, limit=1, device="cuda:3"))
    assert runner.device.type == "cpu"
