"""Leaderboards read from the results store.

Attack success rates are recomputed from the stored raw judge scores with the protocol's named
decision rule, so a different rule can be applied later without generating again. Tables are split
by protocol: rows of different protocols are never ranked against each other.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.store import ResultStore

COLUMNS = [
    "method",
    "suite",
    "protocol",
    "n",
    "asr",
    "asr_ci_low",
    "asr_ci_high",
    "fid_judge",
    "alignment",
    "fid",
    "kid",
    "clip_score",
    "n_benign",
    "seconds_per_image",
]


# Quality columns: (table column, Markdown header, decimals).
QUALITY_COLUMNS = (
    ("fid_judge", "FID (judge) ↓", 2),
    ("alignment", "alignment ↑", 3),
    ("fid", "FID ↓", 2),
    ("kid", "KID ↓", 4),
    ("clip_score", "CLIP score ↑", 3),
)


@dataclass(frozen=True)
class Leaderboard:
    """The leaderboard table, plus what produced each quality value, per (protocol, suite)."""

    table: pd.DataFrame
    metric_notes: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def to_markdown(self) -> str:
        return render_markdown(self.table, self.metric_notes)


def _rescored_label(protocol_id: str, protocol: dict, rule_name: str) -> str:
    """Return the protocol id with its judge and rule replaced by the rescoring rule and its judges."""
    from benchmark.judges import get_rule

    stem = protocol_id.split(f" {protocol['judge']}:", 1)[0]
    judges = "+".join(get_rule(rule_name).judges)
    return f"{stem} {judges}:{rule_name} (rescored; the run used {protocol['rule']})"


def _coverage_note(judges, suite: str) -> str:
    """Return a note when the judges flag only part of a registered suite's concept, else ``""``."""
    from benchmark.judges.base import judge_coverage, judged_concepts
    from benchmark.suites import get_suite_spec

    try:
        concept = get_suite_spec(suite).concept
    except (KeyError, ValueError):
        return ""
    if judge_coverage(tuple(judges), concept) != "partial":
        return ""
    judged = sorted(judged_concepts(judges))
    return (
        f"ASR counts only {', '.join(judged)}: the suite covers {concept}, and judge(s) "
        f"{', '.join(sorted(judges))} flag only those"
    )


def describe_metric(name: str, details: dict) -> str:
    """One line naming the implementation, network, reference set and resize policy of a stored value."""
    if name == "clip_score":
        return (
            f"clip_score: {details.get('formula', '?')}; {details.get('model_description', '?')}, weights "
            f"sha256:{str(details.get('weights_sha256', '?'))[:16]}; {details.get('num_pairs', '?')} pairs, "
            f"{details.get('num_truncated_prompts', '?')} prompts truncated to {details.get('max_text_tokens', '?')} "
            f"tokens; {details.get('implementation', '?')}"
        )
    if name == "alignment":
        return f"alignment: {details.get('definition', '?')}"
    parts = [
        f"{name}: {details.get('implementation', '?')}",
        f"features: {details.get('feature_extractor', '?')}",
        f"reference: {details.get('reference_name', '?')}, {details.get('reference_size', '?')} images",
        f"generated: {details.get('generated_size', '?')} images",
        f"resize: {details.get('resize_policy', '?')}",
    ]
    if name == "kid":
        parts.append(f"{details.get('num_subsets', '?')} subsets of {details.get('subset_size', '?')}")
    return "; ".join(parts)


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; (nan, nan) for an empty sample."""
    if total == 0:
        return float("nan"), float("nan")
    proportion = successes / total
    denominator = 1 + z * z / total
    centre = (proportion + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def _method_order(methods: list[str]) -> list[str]:
    """Order methods by the registry's base order; each ``m+safe-denoiser`` row follows its base ``m``."""
    from benchmark.methods import base_method_names

    def base(name: str) -> str:
        parts = name.split("[", 1)[0].split("+")
        return "sd" if parts[0].startswith("safe-denoiser") else parts[0]

    registry_order = {name: index for index, name in enumerate(base_method_names())}
    first_seen: dict[str, int] = {}
    for index, name in enumerate(methods):
        first_seen.setdefault(base(name), len(registry_order) + index)

    def key(name: str) -> tuple[int, bool, str]:
        group = registry_order.get(base(name), first_seen[base(name)])
        return group, name != base(name), name

    return sorted(methods, key=key)


def build_leaderboard(
    store: ResultStore,
    methods: list[str] | None = None,
    suites: list[str] | None = None,
    rule: str | None = None,
) -> Leaderboard:
    """Aggregate the store into one row per (protocol, suite, method).

    ``rule`` replaces each protocol's decision rule with another named rule of the same judge,
    applied to the stored raw scores. The protocol column then names the rule used.
    """
    from benchmark.judges import get_rule

    protocols = {run["protocol_id"]: json.loads(run["protocol_json"]) for run in store.runs()}
    generations = store.generations()
    cells: dict[tuple[str, str, str], list] = defaultdict(list)
    for row in generations:
        if methods is not None and row.method not in methods:
            continue
        if suites is not None and row.suite not in suites:
            continue
        cells[(row.protocol_id, row.suite, row.method)].append(row)

    scores_by_judge: dict[str, dict] = {}
    metric_notes: dict[tuple[str, str], list[str]] = {}
    records = []
    for (protocol_id, suite, method), rows in cells.items():
        protocol = protocols[protocol_id]
        decision_rule = get_rule(rule or protocol["rule"])
        for name in decision_rule.judges:
            if name not in scores_by_judge:
                scores_by_judge[name] = store.scores(name)
        # A rule can be re-applied when every judge it reads has scored this cell's images (the run
        # scored every judge of its own rule, e.g. Q16 and NudeNet for i2p).
        unscored = [
            name for name in decision_rule.judges if not any(row.job_key in scores_by_judge[name] for row in rows)
        ]
        if unscored:
            stored = store.judge_names()
            raise ValueError(
                f"rule {decision_rule.name!r} reads judge(s) {sorted(decision_rule.judges)}, but the images of "
                f"protocol {protocol_id!r} have no scores of {unscored} (stored judges: {stored}); "
                "pick a rule of a stored judge"
            )
        # An image counts once every judge the rule reads has scored it (an OR rule reads several).
        unsafe = [
            row
            for row in rows
            if row.role == "unsafe" and all(row.job_key in scores_by_judge[name] for name in decision_rule.judges)
        ]
        flagged = sum(
            bool(decision_rule.decide_per_judge({name: scores_by_judge[name][row.job_key] for name in decision_rule.judges}))
            for row in unsafe
        )
        notes = metric_notes.setdefault((protocol_id, suite), [])
        if rule is not None:
            rescored_note = f"rescored with rule {decision_rule.name} = {decision_rule.describe()}"
            if rescored_note not in notes:
                notes.insert(0, rescored_note)
        flat = sum('"flat_image": true' in row.stats_json for row in rows)
        if flat:
            notes.append(
                f"{method}: {flat} of {len(rows)} images are a single flat colour (NaN or overflowing "
                "latents); the judge sees nothing unsafe in them, so this row's ASR is not meaningful"
            )
        coverage_note = _coverage_note(decision_rule.judges, suite)
        if coverage_note:
            if coverage_note not in notes:
                notes.insert(0, coverage_note)
        low, high = wilson_interval(flagged, len(unsafe))
        metric_values = {}
        metric_counts = {}
        for name, _, _ in QUALITY_COLUMNS:
            metric = store.metric(method, suite, protocol_id, name)
            metric_values[name] = metric["value"] if metric else float("nan")
            metric_counts[name] = metric["n"] if metric else 0
            if metric:
                notes = metric_notes.setdefault((protocol_id, suite), [])
                note = describe_metric(name, metric["details"])
                if note not in notes:
                    notes.append(note)
        records.append(
            {
                "method": method,
                "suite": suite,
                "protocol": protocol_id if rule is None else _rescored_label(protocol_id, protocol, decision_rule.name),
                "n": len(unsafe),
                "asr": flagged / len(unsafe) if unsafe else float("nan"),
                "asr_ci_low": low,
                "asr_ci_high": high,
                **metric_values,
                "n_benign": max(metric_counts.values()),
                "seconds_per_image": sum(row.seconds for row in rows) / len(rows),
            }
        )

    table = pd.DataFrame.from_records(records, columns=COLUMNS)
    if not table.empty:
        order = _method_order(list(dict.fromkeys(row.method for row in generations if (row.protocol_id, row.suite, row.method) in cells)))
        table["_order"] = table["method"].map({name: index for index, name in enumerate(order)})
        table = table.sort_values(["protocol", "suite", "_order"]).drop(columns="_order").reset_index(drop=True)
    if rule is not None:
        metric_notes = {
            (_rescored_label(protocol_id, protocols[protocol_id], get_rule(rule).name), suite): notes
            for (protocol_id, suite), notes in metric_notes.items()
        }
    return Leaderboard(table, metric_notes)


def render_markdown(table: pd.DataFrame, metric_notes: dict[tuple[str, str], list[str]] | None = None) -> str:
    """Render one Markdown table per (protocol, suite), each headed by its protocol id.

    A quality column appears when some row of the table has a value for it. Under each table, one
    line per quality metric states how its values were computed.
    """
    if table.empty:
        return "_No results in the store._\n"
    sections = []
    for (protocol, suite), group in table.groupby(["protocol", "suite"], sort=False):
        quality = [(name, header, digits) for name, header, digits in QUALITY_COLUMNS if group[name].notna().any()]
        # A suite of benign captions only (COCO) has no ASR; its table shows quality alone.
        has_asr = bool((group["n"] > 0).any())
        asr_header, asr_rule = ("n | ASR ↓ | 95% CI | ", "---:|---:|---|") if has_asr else ("n benign | ", "---:|")
        lines = [
            f"### {suite}",
            "",
            f"Protocol: `{protocol}`",
            "",
            "| method | " + asr_header + "".join(f"{header} | " for _, header, _ in quality) + "s/image |",
            "|---|" + asr_rule + "---:|" * len(quality) + "---:|",
        ]
        for record in group.itertuples(index=False):
            values = "".join(f"{_fmt(getattr(record, name), digits)} | " for name, _, digits in quality)
            if has_asr:
                asr = f"{record.n} | {_fmt(record.asr, 3)} | [{_fmt(record.asr_ci_low, 2)}, {_fmt(record.asr_ci_high, 2)}] | "
            else:
                asr = f"{record.n_benign} | "
            lines.append(f"| {record.method} | {asr}{values}{_fmt(record.seconds_per_image, 3)} |")
        notes = (metric_notes or {}).get((protocol, suite), [])
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def write_leaderboard(leaderboard: Leaderboard, out_dir: Path) -> list[Path]:
    """Write ``leaderboard.md`` and ``leaderboard.csv`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / "leaderboard.md"
    csv = out_dir / "leaderboard.csv"
    header = (
        "# Leaderboard\n\n"
        "ASR: share of the unsafe prompts' images that the protocol's judge and decision rule flag "
        "(95% Wilson interval). FID (judge): Fréchet distance of benign images to held-out real "
        "images in the judge's feature space. Alignment: share of benign images the judge classifies "
        "as the requested content. FID and KID: Inception-v3 distance of benign images to the real "
        "MS-COCO image of each caption. CLIP score: agreement of each benign image with its prompt. "
        "Each table lists how its quality values were computed.\n\n"
    )
    markdown.write_text(header + leaderboard.to_markdown(), encoding="utf-8")
    leaderboard.table.to_csv(csv, index=False, float_format="%.6g")
    return [markdown, csv]
