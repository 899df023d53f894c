"""Prompt suites: shipped files and checksums, registered suites' rules, user files, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from benchmark.suites import (
    DATA_DIR,
    NO_COLUMN,
    SuiteError,
    get_suite_spec,
    list_suites,
    load_spec,
    load_suite,
    sha256_of_file,
    suite_names,
)

PROMPTS_DIR = DATA_DIR / "prompts"
MINI_FILE = DATA_DIR / "mini" / "mini_digits.csv"

# Row counts documented in benchmark/data/prompts/SOURCES.md.
DOCUMENTED_ROWS = {
    "i2p": 4703,
    "i2p-sexual": 931,
    "i2p-shocking": 856,
    "i2p-harassment": 824,
    "i2p-self-harm": 801,
    "i2p-violence": 756,
    "i2p-illegal-activity": 727,
    "i2p-hate": 231,
    "i2p-hf": 4703,
    "ring-a-bell-nudity": 79,
    "ring-a-bell-violence-k38-eta5.5": 250,
    "ring-a-bell-violence-k77-eta5.5": 250,
    "ring-a-bell-violence-k77-eta5": 250,
    "unlearndiff-nudity": 142,
    "unlearndiff-violence": 756,
    "unlearndiff-illegal": 727,
    "p4d-nudity-esd": 361,
    "p4d-nudity-sld-max": 204,
    "p4d-nudity-sld-strong": 112,
    "p4d-nudity-neg-prompt": 209,
    "p4d-sld-max": 1667,
    "p4d-sld-strong": 1189,
    "copro-1k": 994,
    "copro-10k": 9996,
    "coco-10k": 10000,
    "coco-30k": 30000,
    "coco-30k-10k": 9966,
}


def _sources_md_hashes() -> dict[str, str]:
    text = (PROMPTS_DIR / "SOURCES.md").read_text(encoding="utf-8")
    return dict(
        (path, digest) for digest, path in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)
    )


def _read_pandas(name: str) -> pd.DataFrame:
    spec = get_suite_spec(name)
    return pd.read_csv(DATA_DIR / spec.file, dtype=str, keep_default_na=False)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# Shipped files


def test_shipped_files_match_sources_md_hashes():
    hashes = _sources_md_hashes()
    shipped = sorted(
        str(p.relative_to(PROMPTS_DIR)) for p in PROMPTS_DIR.rglob("*") if p.suffix == ".csv"
    )

    assert len(hashes) == 23
    assert shipped == sorted(hashes)
    for relative, expected in hashes.items():
        assert sha256_of_file(PROMPTS_DIR / relative) == expected, relative


def test_registered_hashes_match_sources_md():
    hashes = _sources_md_hashes()
    for name in suite_names():
        spec = get_suite_spec(name)
        if not spec.file.startswith("prompts/"):
            continue
        assert spec.sha256 == hashes[spec.file.removeprefix("prompts/")], name


def test_every_documented_suite_is_registered():
    assert set(DOCUMENTED_ROWS) <= set(suite_names())


# Registered suites


@pytest.mark.parametrize("name", sorted(DOCUMENTED_ROWS))
def test_registered_suite_row_count(name):
    suite = load_suite(name)

    assert len(suite) == DOCUMENTED_ROWS[name]
    assert suite.sha256 == get_suite_spec(name).sha256
    assert len({row.case_id for row in suite}) == len(suite)


def test_list_suites_reports_documented_rows():
    infos = {info.name: info for info in list_suites()}

    assert list(infos) == suite_names()
    for name, rows in DOCUMENTED_ROWS.items():
        assert infos[name].rows == rows, name
    assert infos["ring-a-bell-nudity"].seed_rule == "seed 42"
    assert infos["ring-a-bell-nudity"].prompt_column == "sensitive prompt"
    assert infos["unlearndiff-nudity"].seed_rule == "column evaluation_seed"


def test_ring_a_bell_nudity_uses_seed_42():
    suite = load_suite("ring-a-bell-nudity")
    frame = _read_pandas("ring-a-bell-nudity")

    assert {row.seed for row in suite} == {42}
    assert all(row.guidance_scale is None for row in suite)
    assert [row.prompt for row in suite] == list(frame["sensitive prompt"])
    assert [row.attributes["normal prompt"] for row in suite] == list(frame["normal prompt"])


def test_ring_a_bell_nudity_prompt_override():
    suite = load_suite("ring-a-bell-nudity", prompt_column="normal prompt")

    assert len(suite) == 79
    frame = _read_pandas("ring-a-bell-nudity")
    assert [row.prompt for row in suite] == list(frame["normal prompt"])
    assert suite.spec.prompt_column == "normal prompt"


def test_unlearndiff_seeds_from_evaluation_seed():
    suite = load_suite("unlearndiff-nudity")
    frame = _read_pandas("unlearndiff-nudity")

    assert [row.seed for row in suite] == [int(s) for s in frame["evaluation_seed"]]
    assert [row.guidance_scale for row in suite] == [
        float(g) for g in frame["evaluation_guidance"]
    ]
    assert [row.case_id for row in suite] == list(frame["case_number"])
    assert sum("sexual" in row.categories for row in suite) == 116


def test_i2p_seed_and_guidance_from_csv():
    suite = load_suite("i2p")
    frame = _read_pandas("i2p")

    assert [row.seed for row in suite] == [int(s) for s in frame["evaluation_seed"]]
    assert [row.guidance_scale for row in suite] == [
        float(g) for g in frame["evaluation_guidance"]
    ]
    # Seeds above 2**31 are kept exactly (I2P's largest is 4,290,749,014).
    assert max(row.seed for row in suite) == max(int(s) for s in frame["evaluation_seed"])


def test_i2p_keeps_empty_prompt(caplog):
    with caplog.at_level(logging.WARNING, logger="benchmark.suites"):
        suite = load_suite("i2p")

    empty = [row for row in suite if not row.prompt.strip()]
    assert [row.index for row in empty] == [2260]
    assert empty[0].case_id == "2260"
    assert "empty prompt" in caplog.text
    assert "data row index 2260" in caplog.text


def test_i2p_hf_matches_i2p_except_null_prompt():
    esd_style = load_suite("i2p")
    hf_style = load_suite("i2p-hf")

    differing = [a.index for a, b in zip(esd_style, hf_style) if a.prompt != b.prompt]
    assert differing == [2260]
    assert hf_style[2260].prompt == "Null"
    assert [a.seed for a in esd_style] == [b.seed for b in hf_style]
    assert [a.guidance_scale for a in esd_style] == [b.guidance_scale for b in hf_style]


def test_i2p_category_suite_matches_pandas_selection():
    suite = load_suite("i2p-sexual")
    frame = _read_pandas("i2p")
    is_sexual = frame["categories"].map(lambda c: "sexual" in [x.strip() for x in c.split(",")])
    selected = frame[is_sexual]

    assert [row.case_id for row in suite] == list(selected["case_number"])
    assert all("sexual" in row.categories for row in suite)


def test_copro_seed_42_and_balanced_categories():
    suite = load_suite("copro-10k")

    assert {row.seed for row in suite} == {42}
    assert len(suite.categories) == 7
    for category in suite.categories:
        assert len(suite.filter(categories=category)) == 1428, category
    assert [row.prompt for row in suite] == list(_read_pandas("copro-10k")["unsafe_prompt"])


def test_coco_10k_keeps_zero_padded_ids():
    suite = load_suite("coco-10k")

    assert suite[0].case_id == "000000203564"
    assert suite[0].seed == 41337


def test_suite_filter_and_limit():
    suite = load_suite("unlearndiff-nudity", limit=10)
    full = load_suite("unlearndiff-nudity")

    assert len(suite) == 10
    assert suite.rows == full.rows[:10]
    assert "limit=10" in suite.filters
    sexual = full.filter(categories="SEXUAL")
    assert len(sexual) == 116
    sd14_rows = full.filter(where={"sd_model": "stable-diffusion-v1-4"})
    assert len(sd14_rows) == 142
    assert len(full.filter(where=lambda row: row.guidance_scale == 7.0)) == sum(
        1 for row in full if row.guidance_scale == 7.0
    )


def test_unknown_suite_name_suggests_close_match():
    with pytest.raises(SuiteError, match="Did you mean 'i2p-sexual'"):
        load_suite("i2p-sexal")


def test_tampered_copy_fails_hash_check(tmp_path):
    spec = get_suite_spec("ring-a-bell-nudity")
    copy = tmp_path / "nudity-ring-a-bell.csv"
    shutil.copyfile(DATA_DIR / spec.file, copy)
    data = bytearray(copy.read_bytes())
    data[100] = ord("X") if data[100] != ord("X") else ord("Y")
    copy.write_bytes(bytes(data))
    tampered = dataclasses.replace(spec, file=str(copy))

    with pytest.raises(SuiteError) as error:
        load_spec(tampered)

    message = str(error.value)
    assert spec.sha256 in message
    assert sha256_of_file(copy) in message
    assert str(copy) in message


def test_untampered_copy_passes_hash_check(tmp_path):
    spec = get_suite_spec("ring-a-bell-nudity")
    copy = tmp_path / "nudity-ring-a-bell.csv"
    shutil.copyfile(DATA_DIR / spec.file, copy)

    assert len(load_spec(dataclasses.replace(spec, file=str(copy)))) == 79


@pytest.mark.skipif(not MINI_FILE.exists(), reason="benchmark/data/mini/mini_digits.csv not built")
def test_mini_suites_split_by_split_column():
    test_split = load_suite("mini")
    dev_split = load_suite("mini-dev")
    frame = pd.read_csv(MINI_FILE, dtype=str, keep_default_na=False)

    assert len(test_split) == int((frame["split"] == "test").sum())
    assert len(dev_split) == int((frame["split"] == "dev").sum())
    assert {row.attributes["split"] for row in test_split} == {"test"}
    assert set(test_split.categories) <= {"unsafe", "benign"}
    assert "target_digit" in test_split[0].attributes


# User files


def test_user_csv_with_column_mapping(tmp_path):
    path = _write(
        tmp_path / "mma.csv",
        "target_prompt,adv_prompt,id\n"
        'a nude person,"adv, tokens 1",a\n'
        "a nude woman,adv tokens 2,b\n",
    )

    suite = load_suite(path, prompt_column="adv_prompt", seed_column=NO_COLUMN, id_column="id")

    assert [row.prompt for row in suite] == ["adv, tokens 1", "adv tokens 2"]
    assert [row.seed for row in suite] == [42, 42]
    assert [row.case_id for row in suite] == ["a", "b"]
    assert suite[0].attributes == {"target_prompt": "a nude person"}
    assert suite.sha256 == sha256_of_file(path)


def test_user_csv_autodetects_standard_columns(tmp_path):
    path = _write(
        tmp_path / "mine.csv",
        "case_number,prompt,evaluation_seed,evaluation_guidance,categories\n"
        '7,a cat,11,7.5,"sexual, violence"\n'
        "9,NA,12,5,\n",
    )

    suite = load_suite(path, default_seed=3)

    assert [row.case_id for row in suite] == ["7", "9"]
    assert [row.seed for row in suite] == [11, 12]
    assert [row.guidance_scale for row in suite] == [7.5, 5.0]
    assert suite[0].categories == ("sexual", "violence")
    assert suite[1].categories == ()
    assert suite[1].prompt == "NA"


def test_user_csv_without_seed_column_uses_default_seed(tmp_path):
    path = _write(tmp_path / "plain.csv", "prompt\na dog\na cat\n")

    suite = load_suite(path, default_seed=7)

    assert [row.seed for row in suite] == [7, 7]
    assert [row.case_id for row in suite] == ["0", "1"]
    assert [row.guidance_scale for row in suite] == [None, None]


def test_user_jsonl_with_column_mapping(tmp_path):
    lines = [
        {"text": "a red car", "my_seed": 5, "cfg": 7.5, "tags": "benign", "n": 1},
        {"text": "a blue car", "my_seed": "6", "cfg": "3", "tags": "benign", "n": 2},
    ]
    path = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")

    suite = load_suite(
        path,
        prompt_column="text",
        seed_column="my_seed",
        guidance_column="cfg",
        category_column="tags",
        id_column="n",
    )

    assert [row.prompt for row in suite] == ["a red car", "a blue car"]
    assert [row.seed for row in suite] == [5, 6]
    assert [row.guidance_scale for row in suite] == [7.5, 3.0]
    assert [row.case_id for row in suite] == ["1", "2"]
    assert suite[0].categories == ("benign",)


def test_user_json_array_loads(tmp_path):
    rows = [{"prompt": "x", "seed": 1}, {"prompt": "y", "seed": 2}]
    path = _write(tmp_path / "p.json", json.dumps(rows))

    suite = load_suite(path)

    assert [(row.prompt, row.seed) for row in suite] == [("x", 1), ("y", 2)]


def test_multiline_prompt_keeps_line_numbers(tmp_path):
    path = _write(
        tmp_path / "multi.csv",
        'prompt,evaluation_seed\n"first line\nsecond line",1\nok,2\nbad seed,x\n',
    )

    with pytest.raises(SuiteError) as error:
        load_suite(path)

    assert error.value.line == 5
    assert error.value.index == 2
    assert "line 5" in str(error.value)


MALFORMED_CASES = {
    # name: (file name, contents as bytes, expected column or None, expected line, message part)
    "missing prompt column": (
        "a.csv", b"text,evaluation_seed\nhello,1\n", "prompt", 1, "pass --prompt-column NAME"
    ),
    "empty prompt": ("a.csv", b"prompt,evaluation_seed\nhello,1\n  ,2\n", "prompt", 3, "empty"),
    "non-integer seed": (
        "a.csv", b"prompt,evaluation_seed\nhello,1\nworld,1.5\n", "evaluation_seed", 3,
        "not an integer",
    ),
    "negative seed": ("a.csv", b"prompt,seed\nhello,-1\n", "seed", 2, "out of range"),
    "non-numeric guidance": (
        "a.csv", b"prompt,evaluation_guidance\nhello,high\n", "evaluation_guidance", 2,
        "not a number",
    ),
    "empty guidance": (
        "a.csv", b"prompt,evaluation_guidance\nhello,\n", "evaluation_guidance", 2, "not a number"
    ),
    "duplicate case id": (
        "a.csv", b"case_number,prompt\n1,a\n2,b\n1,c\n", "case_number", 4, "duplicate case id '1'"
    ),
    "bad encoding": ("a.csv", b"prompt\nhello\ncaf\xe9\n", None, 3, "byte offset 16"),
    "wrong field count": ("a.csv", b"prompt,seed\nhello,1\nhi, there,2\n", None, 3, "3 fields"),
    "unclosed quote": ("a.csv", b'prompt,seed\n"hello,1\n', None, 2, "invalid CSV"),
    "empty file": ("a.csv", b"", None, None, "empty"),
    "header only": ("a.csv", b"prompt,seed\n", None, None, "no data rows"),
    "duplicate header": ("a.csv", b"prompt,prompt\na,b\n", "prompt", 1, "repeats"),
    "jsonl invalid line": ("a.jsonl", b'{"prompt": "a"}\n{"prompt": \n', None, 2, "not valid JSON"),
    "jsonl missing key": (
        "a.jsonl", b'{"prompt": "a", "seed": 1}\n{"seed": 2}\n', "prompt", 2, "missing"
    ),
    "jsonl prompt not string": ("a.jsonl", b'{"prompt": null}\n', "prompt", 1, "not a string"),
    "jsonl seed not integer": (
        "a.jsonl", b'{"prompt": "a", "seed": 1.5}\n', "seed", 1, "not an integer"
    ),
    "unsupported suffix": ("a.txt", b"prompt\nhello\n", None, None, "unsupported file type"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED_CASES))
def test_malformed_file_raises_suite_error(tmp_path, case):
    file_name, contents, column, line, message_part = MALFORMED_CASES[case]
    path = tmp_path / file_name
    path.write_bytes(contents)

    with pytest.raises(SuiteError) as error:
        load_suite(path)

    message = str(error.value)
    assert str(path) in message
    assert message_part in message
    assert error.value.path == path
    assert error.value.line == line
    if line is not None:
        assert f"line {line}" in message
    if column is not None:
        assert error.value.column == column
        assert repr(column) in message


def test_missing_column_lists_columns_present(tmp_path):
    path = _write(tmp_path / "a.csv", "text,evaluation_seed\nhello,1\n")

    with pytest.raises(SuiteError) as error:
        load_suite(path, seed_column="sd_seed", prompt_column="text")

    assert "['text', 'evaluation_seed']" in str(error.value)
    assert "seed_column=" in str(error.value)
    assert error.value.column == "sd_seed"


def test_missing_file_raises_suite_error(tmp_path):
    with pytest.raises(SuiteError, match="not found"):
        load_suite(tmp_path / "absent.csv")


def test_invalid_limit_raises():
    with pytest.raises(SuiteError, match="limit=0"):
        load_suite("ring-a-bell-nudity", limit=0)


def test_spec_where_selects_split(tmp_path):
    path = _write(
        tmp_path / "digits.csv",
        "case_number,prompt,evaluation_seed,category,style,target_digit,split\n"
        "0,a seven,1,unsafe,direct,7,dev\n"
        "1,a three,2,benign,direct,3,test\n"
        "2,lucky number,3,unsafe,paraphrase,7,test\n",
    )
    spec = dataclasses.replace(get_suite_spec("mini"), file=str(path), sha256=sha256_of_file(path), expected_rows=None)

    suite = load_spec(spec)

    assert [row.case_id for row in suite] == ["1", "2"]
    assert [row.categories for row in suite] == [("benign",), ("unsafe",)]
    assert suite[1].attributes["target_digit"] == "7"
    assert len(suite.filter(categories="unsafe")) == 1


def test_spec_row_count_mismatch_raises(tmp_path):
    path = _write(tmp_path / "two.csv", "prompt\na\nb\n")
    spec = dataclasses.replace(
        get_suite_spec("ring-a-bell-nudity"), file=str(path), sha256=None, prompt_column="prompt"
    )

    with pytest.raises(SuiteError, match="selected 2 rows but 79 are documented"):
        load_spec(spec)


@pytest.mark.parametrize(
    ("name", "unsafe", "benign"),
    [("mini-class", 60, 90), ("mini-class-dev", 30, 36), ("mini-uncond", 300, 0), ("mini-uncond-dev", 100, 0)],
)
def test_class_and_unconditional_suites(name, unsafe, benign):
    suite = load_suite(name)
    assert len(suite.filter(categories="unsafe")) == unsafe
    assert len(suite.filter(categories="benign")) == benign
    assert len({row.seed for row in suite}) == len(suite)


def test_class_suites_regenerate_exactly(tmp_path):
    from benchmark.mini.make_class_suites import main as make_class_suites

    make_class_suites(["--out-dir", str(tmp_path)])
    for name in ("mini_classes.csv", "mini_uncond.csv"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / "mini" / name).read_bytes()
