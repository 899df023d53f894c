"""The ``safebench`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from benchmark.methods import DEFAULT_METHODS

# Nothing is ever downloaded: a missing file must fail fast instead of reaching for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# transformers warns on import that torchvision is missing; this suite never uses torchvision.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

logger = logging.getLogger("benchmark")


def _split_names(values: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        return tuple(default)
    names: list[str] = []
    for value in values:
        names.extend(part.strip() for part in value.split(",") if part.strip())
    return tuple(names)


def _parse_weights(values: list[str] | None) -> list[tuple[str, Path]]:
    pairs = []
    for value in values or []:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"--weights {value!r}: expected NAME=PATH, e.g. esd-u=weights/esd-u-nudity")
        pairs.append((name, Path(path)))
    return pairs


def _parse_settings(values: list[str] | None) -> dict[str, dict[str, object]]:
    """Parse ``--set COMPONENT.SETTING=VALUE`` options; VALUE is read as JSON, else kept as text."""
    overrides: dict[str, dict[str, object]] = {}
    for item in values or []:
        key, separator, text = item.partition("=")
        component, dot, setting = key.strip().rpartition(".")
        if not separator or not dot or not component or not setting:
            raise ValueError(
                f"--set {item!r}: expected COMPONENT.SETTING=VALUE, e.g. --set safe-denoiser.scale=0.5"
            )
        try:
            # JSON reads 1e400 as infinity and accepts NaN; the value check rejects both.
            value: object = json.loads(text)
        except json.JSONDecodeError:
            value = text
        overrides.setdefault(component, {})[setting] = value
    return overrides


def _process_group() -> dict[str, object]:
    """Return the Runner's rank arguments: one process, or the group a launcher started.

    ``torchrun`` and ``accelerate launch`` set ``WORLD_SIZE``; accelerate then joins the process
    group (NCCL on GPUs, gloo on CPUs) and provides the barrier.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "local_rank": state.local_process_index,
        "barrier": state.wait_for_everyone,
    }


def _command_run(args: argparse.Namespace) -> int:
    from benchmark.runner import RunConfig, RunPlanError, Runner
    from reports.leaderboard import build_leaderboard, write_leaderboard
    from benchmark.store import ResultStore

    from benchmark.models import EMBEDDED_MODELS, PROMPTLESS_MODELS

    embedded = args.model in EMBEDDED_MODELS
    if args.protocol is None and not embedded:
        print("safebench run: pass --protocol for a real model (see `safebench list protocols`)", file=sys.stderr)
        return 2
    default_methods = ("sd", "safe-denoiser") if args.model in PROMPTLESS_MODELS else DEFAULT_METHODS
    try:
        methods: tuple = _split_names(args.method, default_methods)
        overrides = _parse_settings(args.set)
        if overrides:
            from benchmark.methods import apply_overrides, get_method

            try:
                specs = [get_method(name) for name in methods]
            except KeyError as error:
                raise RunPlanError(str(error.args[0])) from None
            methods = tuple(apply_overrides(specs, overrides))
        config = RunConfig(
            model=args.model,
            suites=_split_names(args.suite, (args.model,) if embedded else ()),
            methods=methods,
            protocol=args.protocol or args.model,
            concept=args.concept,
            out_dir=Path(args.out),
            batch_size=args.batch_size,
            limit=args.limit,
            model_config=args.model_config,
            negation_images=Path(args.negation_images) if args.negation_images else None,
            weights=tuple(_parse_weights(args.weights)),
            negative_prompt=args.negative_prompt,
            prompt_column=args.prompt_column,
            seed_column=args.seed_column,
            category_column=args.category_column,
            reference_images=Path(args.reference_images) if args.reference_images else None,
            inception_weights=Path(args.inception_weights) if args.inception_weights else None,
            clip_model=Path(args.clip_model) if args.clip_model else None,
            skip_quality=args.no_quality,
            device=args.device,
        )
        runner = Runner(config, **_process_group())
    except (RunPlanError, ValueError) as error:
        print(f"safebench run: {error}", file=sys.stderr)
        return 2

    from benchmark.models import ModelLoadError

    try:
        summary = runner.run()
    except (ModelLoadError, RunPlanError) as error:
        print(f"safebench run: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"safebench run: interrupted; finished images are saved in {config.out_dir}. "
            "Run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    if runner.rank != 0:
        # The first process writes the leaderboard once every process has finished.
        return 0
    # The files and the printed table cover the whole store, as `safebench report` writes them.
    with ResultStore(config.out_dir / "results.sqlite") as store:
        leaderboard = build_leaderboard(store)
    paths = write_leaderboard(leaderboard, config.out_dir)
    print(leaderboard.to_markdown())
    processes = f" by process 0 of {runner.world_size} (the others generated their shares)" if runner.world_size > 1 else ""
    print(
        f"run {summary.run_id}: {summary.generated} images generated, {summary.skipped} reused, "
        f"{summary.scored} scored in {summary.seconds:.0f} s{processes}"
    )
    print("wrote " + ", ".join(str(path) for path in [*paths, config.out_dir / "results.sqlite"]))
    return 0


def _command_report(args: argparse.Namespace) -> int:
    from benchmark.store import ResultStore
    from reports.leaderboard import build_leaderboard, write_leaderboard

    database = Path(args.out) / "results.sqlite"
    if not database.is_file():
        print(f"safebench {args.command_name}: no results store at {database}; run `safebench run --out {args.out}` first", file=sys.stderr)
        return 2
    with ResultStore(database) as store:
        try:
            leaderboard = build_leaderboard(store, rule=args.rule)
        except (KeyError, ValueError) as error:
            print(f"safebench {args.command_name}: {error.args[0]}", file=sys.stderr)
            return 2
    if args.rule is None:
        write_leaderboard(leaderboard, Path(args.out))
    print(leaderboard.to_markdown())
    return 0


def _command_protocol(args: argparse.Namespace) -> int:
    from benchmark.protocols import get_protocol

    try:
        protocol = get_protocol(args.name)
    except KeyError as error:
        print(f"safebench protocol: {error.args[0]}", file=sys.stderr)
        return 2
    print(protocol.card())
    return 0


def _command_list(args: argparse.Namespace) -> int:
    if args.what == "suites":
        from benchmark.suites import list_suites

        infos = list_suites()
        width = max(len(info.name) for info in infos)
        for info in infos:
            print(f"{info.name:<{width}}  {info.rows:>6} rows  {info.concept or '-':<10}  prompt={info.prompt_column!r}  seed={info.seed_rule}")
    elif args.what == "methods":
        from benchmark.methods import available_methods, get_method

        for name in available_methods():
            print(f"{name:<32}  {get_method(name).description}")
    elif args.what == "protocols":
        from benchmark.protocols import PROTOCOLS

        for protocol in PROTOCOLS.values():
            print(f"{protocol.name:<14}  {protocol.protocol_id}")
    elif args.what == "concepts":
        from benchmark.concepts import CONCEPTS

        for concept in CONCEPTS.values():
            source = "--negation-images DIR needed" if concept.needs_negation_images else "negation set ships"
            print(f"{concept.name:<14}  {concept.description} ({source})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safebench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="generate, score and tabulate (resumable)")
    run.add_argument("--model", default="mini", help="'mini', 'mini-class' or 'mini-uncond' (embedded), a diffusers folder, a .safetensors file or a cached hub id (default: mini)")
    run.add_argument("--model-config", default=None, help="local diffusers config folder for a single-file checkpoint")
    run.add_argument("--suite", action="append", help="prompt suite name or CSV/JSONL path; repeat or comma-separate (default for an embedded model: the suite of the same name)")
    run.add_argument("--method", action="append", help=f"method names; repeat or comma-separate (default: {','.join(DEFAULT_METHODS)})")
    run.add_argument("--protocol", default=None, help="protocol preset name (default for an embedded model: the preset of the same name)")
    run.add_argument("--concept", default=None, help="unsafe concept the defenses target: digit-7, nudity or inappropriate (see `safebench list concepts`; default for the embedded models: digit-7; not needed when every method is undefended)")
    run.add_argument("--out", default=str(Path("results") / "mini"), help="output directory for images, results.sqlite and leaderboards (default: results/mini)")
    run.add_argument("--negation-images", default=None, help="folder of unwanted images for the safe denoiser's negation set (required for real models)")
    run.add_argument("--weights", action="append", help="replacement UNet of an unlearning method, NAME=PATH (e.g. esd-u=DIR); repeatable")
    run.add_argument("--negative-prompt", default=None, help="negative prompt text for neg-prompt methods, in place of the concept's preset (nudity: the 17-phrase list)")
    run.add_argument("--prompt-column", default=None, help="prompt column of a user CSV/JSONL (default: prompt)")
    run.add_argument("--seed-column", default=None, help="seed column of a user file (default: evaluation_seed, sd_seed or seed; else 42)")
    run.add_argument("--category-column", default=None, help="category column of a user file; rows whose category is 'benign' score quality, the others ASR")
    run.add_argument("--set", action="append", metavar="COMPONENT.SETTING=VALUE", help="override a defense setting for every method of the run that uses it, e.g. safe-denoiser.scale=0.5, sld.sld_guidance_scale=2000 or safree.alpha=0.05; changed methods get the override in their name; repeatable")
    run.add_argument("--reference-images", default=None, help="folder of the real MS-COCO images of the caption suites, for FID and KID (COCO_val2014_<id>.jpg or <id>.jpg)")
    run.add_argument("--inception-weights", default=None, help="pytorch-fid Inception weights file pt_inception-2015-12-05-6726825d.pth (default: $SAFEBENCH_FID_INCEPTION, else $SAFEBENCH_HOME/metrics/)")
    run.add_argument("--clip-model", default=None, help="CLIP model folder for the CLIP score, saved with save_pretrained (default: $SAFEBENCH_CLIP_SCORE_MODEL, else $SAFEBENCH_HOME/metrics/clip-vit-base-patch32)")
    run.add_argument("--no-quality", action="store_true", help="skip the protocol's quality metrics")
    run.add_argument("--device", default=None, help="torch device of a real model, e.g. cpu, cuda or cuda:1 (default: this process's GPU if there is one, else cpu); the embedded models always run on the CPU")
    run.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (default: 32)")
    run.add_argument("--limit", type=int, default=None, help="use only the first N rows of each suite")
    run.set_defaults(handler=_command_run)

    report = commands.add_parser("report", help="rebuild leaderboard.md and leaderboard.csv from a results store")
    report.add_argument("--out", default=str(Path("results") / "mini"), help="output directory that contains results.sqlite")
    report.add_argument("--rule", default=None, help="re-apply another named decision rule of the same judge to the stored scores; prints only, the files keep the protocol's rule")
    report.set_defaults(handler=_command_report, command_name="report")

    rescore = commands.add_parser("rescore", help="re-apply a named decision rule to the stored raw scores and print the leaderboard")
    rescore.add_argument("--out", default=str(Path("results") / "mini"), help="output directory that contains results.sqlite")
    rescore.add_argument("--rule", required=True, help="decision rule name of the same judge, e.g. rece or eval-learn")
    rescore.set_defaults(handler=_command_report, command_name="rescore")

    card = commands.add_parser("protocol", help="print a protocol preset's card")
    card.add_argument("name", help="protocol preset name (see `safebench list protocols`)")
    card.set_defaults(handler=_command_protocol)

    listing = commands.add_parser("list", help="list suites, methods or protocols")
    listing.add_argument("what", choices=["suites", "methods", "protocols", "concepts"])
    listing.set_defaults(handler=_command_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
