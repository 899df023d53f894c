"""The standard prompt suites that ship with the package, by the names the command line uses.

Provenance, licenses and quirks of every file are in ``benchmark/data/prompts/SOURCES.md``.
"""

from __future__ import annotations

import dataclasses

from .spec import SuiteSpec

_I2P_SEED = ("evaluation_seed", "sd_seed")
_I2P_GUIDANCE = ("evaluation_guidance", "sd_guidance_scale")

_I2P_SOURCE = (
    "I2P, Schramowski et al., Safe Latent Diffusion, CVPR 2023 (arXiv 2211.05105); ESD-style "
    "column names as copied in jaehong31/SAFREE@b8b2c3f datasets/i2p.csv"
)
_I2P_LICENSE = "MIT (HF AIML-TUDA/i2p card); SAFREE repository: no license file"

# Prompt counts per I2P category. A prompt can be in several categories.
_I2P_CATEGORIES = {
    "sexual": 931,
    "shocking": 856,
    "harassment": 824,
    "self-harm": 801,
    "violence": 756,
    "illegal activity": 727,
    "hate": 231,
}

_UNLEARNDIFF_SOURCE = (
    "UnlearnDiffAtk, Zhang et al., ECCV 2024 (arXiv 2310.11868); "
    "OPTML-Group/Diffusion-MU-Attack@5a3e5d3 prompts/"
)
_P4D_SOURCE = (
    "P4D ideal prompts, Chin et al., Prompting4Debugging, ICML 2024 (arXiv 2309.06135); "
    "joycenerd/P4D@2cf3cda data/"
)
_RING_A_BELL_SOURCE = (
    "Ring-A-Bell, Tsai, Hsu et al., ICLR 2024 (arXiv 2310.10012); "
    "chiayi-hsu/Ring-A-Bell@e4585ad data/InvPrompt/Violence/"
)
_COPRO_SOURCE = (
    "CoPro from Latent Guard, Liu et al., ECCV 2024 (arXiv 2404.08031), balanced by "
    "MingyuKim87/Safe_Denoiser@223415b datasets/"
)
_COCO_SOURCE = "MS-COCO captions; the 30k list originates in ESD/UCE (Gandikota et al.)"


def _i2p_suites() -> list[SuiteSpec]:
    full = SuiteSpec(
        name="i2p",
        file="prompts/i2p/i2p.csv",
        sha256="6c1821aeeb20beb276b4e20ce4c4b801f9106dc935bafc9f6fd5e12aa2651e6f",
        prompt_column="prompt",
        seed_column=_I2P_SEED,
        guidance_column=_I2P_GUIDANCE,
        category_column="categories",
        id_column="case_number",
        empty_prompt="keep",
        expected_rows=4703,
        concept="inappropriate (7 categories)",
        denominator=(
            "all 4,703 prompts, including the empty prompt at data row 2260, which the published "
            "I2P figures count"
        ),
        description=(
            "Inappropriate Image Prompts: real lexica.art prompts in 7 categories, each with the "
            "seed and guidance scale of its SD-1.4 reference images (I2P generates 10 per prompt)."
        ),
        source=_I2P_SOURCE,
        license=_I2P_LICENSE,
    )
    suites = [full]
    for category, count in _I2P_CATEGORIES.items():
        suites.append(
            dataclasses.replace(
                full,
                name="i2p-" + category.replace(" ", "-"),
                category_filter=(category,),
                expected_rows=count,
                concept=category,
                denominator=f"the {count:,} I2P prompts whose categories include {category!r}",
                description=f"I2P prompts in the {category!r} category.",
            )
        )
    suites.append(
        dataclasses.replace(
            full,
            name="i2p-hf",
            file="prompts/i2p/i2p_benchmark.csv",
            sha256="5e78f211b3944d90182ab708ed0bd8af657c24a308153e6ccd5db9d9dbfe50cb",
            id_column=None,
            empty_prompt="error",
            denominator="all 4,703 prompts; data row 2260 is the literal text 'Null'",
            description=(
                "I2P with the Hugging Face column names (sd_seed, sd_guidance_scale), where the "
                "empty prompt of data row 2260 reads 'Null'. Same prompts and order as 'i2p'."
            ),
            source=(
                "I2P, Schramowski et al., CVPR 2023; HF AIML-TUDA/i2p i2p_benchmark.csv as copied "
                "in Con6924/SPM@3dd762e benchmark/"
            ),
            license="MIT (HF card); SPM repository: Apache-2.0",
        )
    )
    return suites


def _unlearndiff_suites() -> list[SuiteSpec]:
    base = SuiteSpec(
        name="unlearndiff-nudity",
        file="prompts/unlearndiffatk/nudity.csv",
        sha256="0a40f6e63bca976513d1d56df71480239ba1eb5c7a9de4df2f535d80f6e0eccd",
        prompt_column="prompt",
        seed_column="evaluation_seed",
        guidance_column="evaluation_guidance",
        category_column="categories",
        id_column="case_number",
        expected_rows=142,
        concept="nudity",
        denominator="all 142 prompts (the published pre-attack ASR 1.41% is 2/142)",
        description=(
            "UnlearnDiffAtk's nudity attack prompts: an I2P subset, 116 of them in the "
            "'sexual' category. Also SAFREE's and Safe Denoiser's nudity.csv."
        ),
        source=_UNLEARNDIFF_SOURCE,
        license="MIT",
    )
    violence = dataclasses.replace(
        base,
        name="unlearndiff-violence",
        file="prompts/unlearndiffatk/violence.csv",
        sha256="548c603038d559e71d9b0ecce8aa5867e41869ef948a227fb4be29d4c2bb1b13",
        expected_rows=756,
        concept="violence",
        denominator="all 756 prompts",
        description="Every I2P prompt in the 'violence' category, as UnlearnDiffAtk ships it.",
    )
    illegal = dataclasses.replace(
        base,
        name="unlearndiff-illegal",
        file="prompts/unlearndiffatk/illegal.csv",
        sha256="2de0690881b50d072f634c77159152ea4fb2d4adbfed1d717f2232c5c68f1100",
        expected_rows=727,
        concept="illegal activity",
        denominator="all 727 prompts",
        description=(
            "Every I2P prompt in the 'illegal activity' category, as UnlearnDiffAtk ships it "
            "(I2P's empty prompt, row 2260, reads 'NuLL' here)."
        ),
    )
    return [base, violence, illegal]


def _p4d_suites() -> list[SuiteSpec]:
    # (name, file, sha256, rows, concept, defense the prompts were selected against)
    subsets = [
        ("p4d-nudity-esd", "unsafe-prompts-nudity_esd.csv",
         "c07631944478ae2be118d5e689a48d748265f94b59aa15718a94001257bd7124", 361, "nudity", "ESD"),
        ("p4d-nudity-sld-max", "unsafe-prompts-nudity_sldMAX.csv",
         "f1b22afdf531412f24a535dcc9badb04a88cd5501d9ff1ce9443a13cfb4dc0b3", 204, "nudity",
         "SLD-MAX"),
        ("p4d-nudity-sld-strong", "unsafe-prompts-nudity_sldSTRONG.csv",
         "1be18e57c684222bd11108e57562fe386141e5636a99dce6b7eedfa53a385849", 112, "nudity",
         "SLD-STRONG"),
        ("p4d-nudity-neg-prompt", "unsafe-prompts-nudity_std_neg.csv",
         "2a76bf535d50d1109f8d8149b0e1417ebac1b0f558f43a419ff0d0f346382bfc", 209, "nudity",
         "SD with a negative prompt"),
        ("p4d-sld-max", "unsafe-prompts_sldMAX.csv",
         "a75a68b64953895e7001ec20b99225a87adc5ffd95d1024e62b1bebb1a81aa33", 1667,
         "inappropriate (7 categories)", "SLD-MAX"),
        ("p4d-sld-strong", "unsafe-prompts_sldSTRONG.csv",
         "a414c3bb676a43be4ca49a6996e790d306cd53341de11bf803e42b0c6f114248", 1189,
         "inappropriate (7 categories)", "SLD-STRONG"),
    ]  # fmt: skip
    suites = []
    for name, file, sha256, rows, concept, defense in subsets:
        judge = "NudeNet" if concept == "nudity" else "the I2P judges"
        suites.append(
            SuiteSpec(
                name=name,
                file=f"prompts/p4d/{file}",
                sha256=sha256,
                prompt_column="prompt",
                seed_column="evaluation_seed",
                guidance_column="evaluation_guidance",
                category_column="categories",
                id_column="case_number",
                expected_rows=rows,
                concept=concept,
                denominator=f"all {rows:,} prompts",
                description=(
                    f"P4D 'ideal' I2P prompts: SD-1.4 gives an image {judge} flags as unsafe but "
                    f"{defense} gives a safe one. These are the inputs of P4D's optimisation, not "
                    "its optimised prompts."
                ),
                source=_P4D_SOURCE,
                license="MIT",
            )
        )
    return suites


def _ring_a_bell_suites() -> list[SuiteSpec]:
    nudity = SuiteSpec(
        name="ring-a-bell-nudity",
        file="prompts/ring-a-bell/nudity-ring-a-bell.csv",
        sha256="2bd9056f41d92b82c87748db480416ddfc11c39ecf734f62a7ea4a51b9269740",
        prompt_column="sensitive prompt",
        seed_column=None,
        default_seed=42,
        expected_rows=79,
        concept="nudity",
        denominator="all 79 prompts, as SAFREE and Safe Denoiser report it",
        description=(
            "79 hand-written sentences describing nudity that SAFREE and Safe Denoiser evaluate "
            "as 'Ring-A-Bell' with seed 42. They are not Ring-A-Bell's adversarial prompts. The "
            "'normal prompt' column holds clothed counterparts (load with "
            "prompt_column='normal prompt')."
        ),
        source=(
            "jaehong31/SAFREE@b8b2c3f datasets/nudity-ring-a-bell.csv (same bytes as "
            "CharlesGong12/RECE@403a67f dataset/)"
        ),
        license="SAFREE: no license file; RECE: Apache-2.0",
    )
    suites = [nudity]
    # (K = prompt length in tokens, eta = concept-vector strength, file, sha256)
    inv_prompts = [
        ("38", "5.5", "Violence_eta_5.5_K_38.csv",
         "d769a433571f7f33b71c7a1b22deb7cc68756f944f2c9dce5924a530ab3ced57"),
        ("77", "5.5", "Violence_eta_5.5_K_77.csv",
         "6a7c8126ff9054d13025c77b5e23531fbbbdfcab73bc424c17a76862d8ac44a1"),
        ("77", "5", "Violence_eta_5_K_77.csv",
         "06ad1bcba205028fa845dfaf2e5cde8bbb8296ee60957844521252bb2edb8a08"),
    ]  # fmt: skip
    for length, eta, file, sha256 in inv_prompts:
        suites.append(
            SuiteSpec(
                name=f"ring-a-bell-violence-k{length}-eta{eta}",
                file=f"prompts/ring-a-bell/{file}",
                sha256=sha256,
                prompt_column="prompt",
                seed_column="evaluation_seed",
                id_column="case_number",
                expected_rows=250,
                concept="violence",
                denominator="all 250 prompts",
                description=(
                    f"Ring-A-Bell's adversarial violence prompts (InvPrompt), {length} tokens, "
                    f"concept strength eta={eta}: token soup found by genetic search."
                ),
                source=_RING_A_BELL_SOURCE,
                license="MIT",
            )
        )
    return suites


def _copro_suites() -> list[SuiteSpec]:
    suites = []
    for name, file, sha256, rows, per_category in (
        ("copro-1k", "CoPro_balanced_1k.csv",
         "0ba7b85614dec7f459fee4eac32c037022214bca573b496fe7d802b01e92838b", 994, 142),
        ("copro-10k", "CoPro_balanced_10k.csv",
         "7d8a13a73519cda437c9f7d0cf8f4b3309be3ef758d0c6ddcc53ae3bd89fa903", 9996, 1428),
    ):  # fmt: skip
        suites.append(
            SuiteSpec(
                name=name,
                file=f"prompts/copro/{file}",
                sha256=sha256,
                prompt_column="unsafe_prompt",
                seed_column=None,
                default_seed=42,
                category_column="category",
                category_separator=None,
                id_column="idx",
                expected_rows=rows,
                concept="unsafe (7 categories)",
                denominator=f"all {rows:,} prompts; per category {per_category:,}",
                description=(
                    f"CoPro unsafe prompts, {per_category:,} per category for 7 categories "
                    "(sampled with random_state=42), generated from unsafe_prompt with seed 42 "
                    "as Safe Denoiser does. safe_prompt holds the safe counterpart."
                ),
                source=_COPRO_SOURCE,
                license="Safe_Denoiser: no license file; CoPro upstream: BSD-3-Clause",
            )
        )
    return suites


def _coco_suites() -> list[SuiteSpec]:
    suites = []
    for name, file, sha256, rows, note, source, license in (
        ("coco-30k", "coco_30k.csv",
         "87a3f463164120ca2d1efdbc251f443c7b0043214f767cd1852419d295db9ab5", 30000,
         "one caption per COCO image for 30,000 images",
         "jaehong31/SAFREE@b8b2c3f datasets/coco_30k.csv (same bytes as UCE data/)",
         "captions CC-BY-4.0; SAFREE: no license file; UCE: MIT"),
        ("coco-30k-10k", "coco_30k_10k.csv",
         "86687102ed257c422ad3f798dca0938ddb8610cca37848e6cf463df5b8badb80", 9966,
         "case_number 9967-19932 of coco-30k, SAFREE's FID/CLIP subset",
         "jaehong31/SAFREE@b8b2c3f datasets/coco_30k_10k.csv",
         "captions CC-BY-4.0; SAFREE: no license file"),
        ("coco-10k", "coco_10k.csv",
         "785b35c0586d7231790cb2139385a831cff9f631aa38725f84c9ee55376902f4", 10000,
         "the 10k subset AdvUnlearn and UnlearnDiffAtk use for FID/CLIP; case_number is the "
         "zero-padded COCO image id",
         "OPTML-Group/AdvUnlearn@9d23124 data/prompts/coco_10k.csv",
         "CC-BY-4.0"),
    ):  # fmt: skip
        suites.append(
            SuiteSpec(
                name=name,
                file=f"prompts/coco/{file}",
                sha256=sha256,
                prompt_column="prompt",
                seed_column="evaluation_seed",
                id_column="case_number",
                expected_rows=rows,
                concept="benign",
                denominator=(
                    f"not an attack set: quality metrics (FID, CLIP score) over all {rows:,} "
                    "captions"
                ),
                description=f"Benign MS-COCO captions: {note}.",
                source=f"{_COCO_SOURCE}; {source}",
                license=license,
            )
        )
    return suites


def _mini_suites() -> list[SuiteSpec]:
    test = SuiteSpec(
        name="mini",
        file="mini/mini_digits.csv",
        sha256="46b824bc3880962808597d588f4b6a0bcb4832ebaa6a83af320a7240f88da785",
        prompt_column="prompt",
        seed_column="evaluation_seed",
        category_column="category",
        category_separator=None,
        id_column="case_number",
        where=(("split", "test"),),
        expected_rows=210,
        concept="embedded unsafe digit",
        denominator="test-split prompts in category 'unsafe'; 'benign' prompts score quality",
        description=(
            "Embedded suite for the miniature digit models: direct, paraphrased and adversarial "
            "prompts for the digit treated as unsafe, plus benign prompts (test split)."
        ),
        source="written for this package (benchmark/data/mini)",
        license="MIT",
    )
    dev = dataclasses.replace(
        test,
        name="mini-dev",
        where=(("split", "dev"),),
        expected_rows=96,
        denominator="dev-split prompts in category 'unsafe'; 'benign' prompts score quality",
        description=test.description.replace("(test split)", "(dev split, for tuning)"),
    )
    classes = dataclasses.replace(
        test,
        name="mini-class",
        file="mini/mini_classes.csv",
        sha256="24823d037ef00ea7d0f47f706b8479869b2a033b965e91bc43cd0a73a18e6340",
        expected_rows=150,
        denominator="test-split rows asking for class 7; rows of the other classes score quality",
        description=(
            "Embedded suite for the class-conditional miniature model: class 7 asked for directly "
            "(unsafe) and the other nine classes (benign), test split."
        ),
    )
    classes_dev = dataclasses.replace(
        classes,
        name="mini-class-dev",
        where=(("split", "dev"),),
        expected_rows=66,
        description=classes.description.replace("test split", "dev split, for tuning"),
    )
    unconditional = dataclasses.replace(
        test,
        name="mini-uncond",
        file="mini/mini_uncond.csv",
        sha256="b0f31415b3682093c5ea56f2905b2e6033bd3d8e61635250469130f8b6c6fccc",
        expected_rows=300,
        empty_prompt="expected",
        denominator="all test-split unconditional samples; ASR is the share judged as 7",
        description="Embedded suite for the unconditional miniature model: one row per sample seed, test split.",
    )
    unconditional_dev = dataclasses.replace(
        unconditional,
        name="mini-uncond-dev",
        where=(("split", "dev"),),
        expected_rows=100,
        description=unconditional.description.replace("test split", "dev split, for tuning"),
    )
    return [test, dev, classes, classes_dev, unconditional, unconditional_dev]


STANDARD_SUITES: tuple[SuiteSpec, ...] = tuple(
    _mini_suites()
    + _i2p_suites()
    + _ring_a_bell_suites()
    + _unlearndiff_suites()
    + _p4d_suites()
    + _copro_suites()
    + _coco_suites()
)
