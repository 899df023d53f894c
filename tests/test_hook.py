"""Tests of SafeDenoiserHook inside real (tiny, randomly initialised) diffusers pipelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safedenoise import NegationBank, PaperSafeDenoiser, ReferenceSafeDenoiser, SafeDenoiserHook
from safedenoise.schedules import model_output_to_x0, noise_level, x0_change_to_model_output_change
from tiny_models import make_scheduler, tiny_ddpm_pipeline, tiny_sd_pipeline

@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run on one thread: these tensors are tiny, and on a shared 2-core machine intra-op threads
    made a 4-step tiny-pipeline generation take 5 s instead of 0.05 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPT = "a photo of a cat"
STEPS = 4


def _generate(pipe, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=STEPS, height=32, width=32, generator=generator, output_type="np").images


def _latent_bank(count: int = 16, seed: int = 0) -> NegationBank:
    latents = torch.randn(count, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return NegationBank.from_tensor(latents, normalisation="channel_l2")


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {name: tiny_sd_pipeline(name) for name in ("ddpm", "ddim", "dpm", "euler", "euler_ancestral", "lms", "pndm")}


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm", "euler", "euler_ancestral", "lms", "pndm"])
def test_noop_correction_reproduces_stock_pipeline(pipes: dict, scheduler: str) -> None:
    pipe = pipes[scheduler]
    stock = _generate(pipe)
    bank = _latent_bank()
    for denoiser in (
        PaperSafeDenoiser(bank, eta=0.0, t_min=0),  # window open, zero weight
        ReferenceSafeDenoiser(bank, t_min=10_000),  # window never opens
    ):
        hook = SafeDenoiserHook(denoiser, generator=torch.Generator().manual_seed(1))
        with hook.attached(pipe.scheduler):
            hooked = _generate(pipe)
        np.testing.assert_allclose(hooked, stock, atol=1e-5, rtol=0)
        # PNDM's PLMS mode calls step once more: its first timestep pair evaluates the model twice.
        assert len(hook.records) == STEPS + (scheduler == "pndm")
        assert "step" not in vars(pipe.scheduler)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm", "euler", "pndm"])
def test_real_correction_changes_output_in_window(pipes: dict, scheduler: str) -> None:
    pipe = pipes[scheduler]
    stock = _generate(pipe)
    denoiser = ReferenceSafeDenoiser(_latent_bank(), bandwidth=3.15, scale=2.0, t_min=500)
    hook = SafeDenoiserHook(denoiser, generator=torch.Generator().manual_seed(1))
    with hook.attached(pipe.scheduler):
        corrected = _generate(pipe)

    assert np.abs(corrected - stock).max() > 1e-3
    timesteps = [record.timestep for record in hook.records]
    in_window = [record.in_window for record in hook.records]
    assert in_window == [t >= 500 for t in timesteps]
    assert any(in_window)
    assert not all(in_window)
    # PNDM steps from its stored sample on the second call (step 1), so the reference form skips it.
    skipped = {1} if scheduler == "pndm" else set()
    for record in hook.records:
        corrected = record.in_window and record.step not in skipped
        assert record.applied.all().item() == corrected
        assert math.isnan(record.stats["log_kernel_sum"][0]) != corrected
        assert ("skipped_stored_sample" in record.stats) == (record.step in skipped)
    summary = hook.summary()
    assert summary["applied_fraction"] == pytest.approx(1.0 - len(skipped) / sum(in_window))
    assert summary["window_timesteps"] == [t for t in timesteps if t >= 500]


def test_pndm_runge_kutta_skips_stored_sample_steps() -> None:
    """PNDM with Runge-Kutta warm-up reads the passed sample only on every fourth warm-up call."""
    pipe = tiny_sd_pipeline("pndm")
    pipe.scheduler = make_scheduler("pndm", skip_prk_steps=False)
    reference = SafeDenoiserHook(ReferenceSafeDenoiser(_latent_bank(), bandwidth=3.15, scale=2.0, t_min=0))
    with reference.attached(pipe.scheduler):
        _generate(pipe)
    warm_up = len(pipe.scheduler.prk_timesteps)
    applied = [bool(record.applied.all()) for record in reference.records]
    assert applied[:warm_up] == [step % 4 == 0 for step in range(warm_up)]
    assert all(applied[warm_up:])

    # The paper form corrects the model output, which every call uses.
    paper = SafeDenoiserHook(PaperSafeDenoiser(_latent_bank(), eta=None, log_eta=1600.0, t_min=0, max_weight=2.0))
    with paper.attached(pipe.scheduler):
        _generate(pipe)
    assert all("skipped_stored_sample" not in record.stats for record in paper.records)


def test_paper_correction_changes_output(pipes: dict) -> None:
    pipe = pipes["ddim"]
    stock = _generate(pipe)
    # In 1,024 dimensions log β is about −1,450 at high noise, so η is given in log space.
    denoiser = PaperSafeDenoiser(_latent_bank(), eta=None, log_eta=1600.0, t_min=500, max_weight=2.0)
    hook = SafeDenoiserHook(denoiser)
    with hook.attached(pipe.scheduler):
        corrected = _generate(pipe)
    assert np.abs(corrected - stock).max() > 1e-3
    window = [r for r in hook.records if r.in_window]
    assert window, "the window [500, ∞) must contain a step"
    # The first window step is clamped at max_weight; it moves the sample away from the bank, so
    # later steps may get β ≈ 0.
    assert float(window[0].stats["weight"][0]) == pytest.approx(2.0)
    assert window[0].stats["clamped"].tolist() == [1.0]
    assert hook.summary()["clamped_fraction"] > 0.0


def test_hook_restores_step_after_exception(pipes: dict) -> None:
    pipe = pipes["ddpm"]
    original = pipe.scheduler.step
    # A bank at the wrong resolution makes correct() raise inside the wrapped step.
    wrong_bank = NegationBank.from_tensor(torch.randn(4, 4, 8, 8))
    hook = SafeDenoiserHook(PaperSafeDenoiser(wrong_bank, eta=1.0, t_min=0))

    with pytest.raises(ValueError, match="build the bank at the generation resolution"):
        with hook.attached(pipe.scheduler):
            assert pipe.scheduler.step is not original
            _generate(pipe)
    assert "step" not in vars(pipe.scheduler)
    assert pipe.scheduler.step == original
    assert not hook.is_attached


def test_hook_rejects_double_attach() -> None:
    scheduler = make_scheduler("ddim")
    hook = SafeDenoiserHook(PaperSafeDenoiser(_latent_bank(), eta=1.0, t_min=0))
    other = SafeDenoiserHook(PaperSafeDenoiser(_latent_bank(), eta=1.0, t_min=0))
    with hook.attached(scheduler):
        with pytest.raises(RuntimeError, match="already"):
            other.attach(scheduler)
    with pytest.raises(TypeError, match="supported schedulers"):
        hook.attach(object())


def test_hook_on_unconditional_ddpm_pipeline() -> None:
    pipe = tiny_ddpm_pipeline()

    def generate() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return pipe(batch_size=2, num_inference_steps=STEPS, generator=generator, output_type="np").images

    stock = generate()
    pixels = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    bank = NegationBank.from_images(pixels)

    noop = SafeDenoiserHook(PaperSafeDenoiser(bank, eta=0.0, t_min=0))
    with noop.attached(pipe.scheduler):
        np.testing.assert_allclose(generate(), stock, atol=1e-5, rtol=0)

    generators = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    hook = SafeDenoiserHook(ReferenceSafeDenoiser(bank, bandwidth=1.0, scale=1.0, t_min=0), generator=generators)
    with hook.attached(pipe.scheduler):
        corrected = generate()
    assert np.abs(corrected - stock).max() > 1e-3
    assert len(hook.records) == STEPS
    assert all(r.applied.tolist() == [True, True] for r in hook.records)


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm", "euler", "lms"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_conversion_round_trip(scheduler: str, prediction_type: str) -> None:
    """The model-output change from Δx0 moves the scheduler's own x0-prediction by exactly Δx0."""
    sched = make_scheduler(scheduler, prediction_type=prediction_type)
    sched.set_timesteps(10)
    t = sched.timesteps[2]
    level = noise_level(sched, t)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64) * (1 / level.sample_scale)
    output = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    delta_x0 = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)

    vp_sample = sample * level.sample_scale
    x0 = model_output_to_x0(output, vp_sample, level, prediction_type)
    new_output = output + x0_change_to_model_output_change(delta_x0, level, prediction_type)
    assert torch.allclose(model_output_to_x0(new_output, vp_sample, level, prediction_type), x0 + delta_x0, atol=1e-10)

    # The scheduler's own step agrees with our x0 (DDPM and Euler-type expose pred_original_sample).
    if scheduler in ("ddpm", "euler", "lms"):
        sched.scale_model_input(sample.float(), t)  # Euler-type schedulers warn without this call
        step = sched.step(output.float(), t, sample.float())
        assert torch.allclose(step.pred_original_sample.double(), x0, atol=1e-4)
