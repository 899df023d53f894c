"""The SQLite results store: schema, idempotent writes, atomic transactions, concurrent writers."""

import multiprocessing
import sqlite3
import time

import pytest

from benchmark.store import GenerationRow, ResultStore


def _row(key: str, method: str = "sd", suite: str = "mini", role: str = "unsafe") -> GenerationRow:
    return GenerationRow(
        job_key=key,
        run_id="run",
        method=method,
        method_json="{}",
        model_id="mini@x",
        suite=suite,
        suite_sha256="abc",
        protocol_id="mini-v1",
        row_index=int(key.split("-")[-1]),
        case_id=key,
        image_index=0,
        prompt="a seven",
        seed=1,
        guidance_scale=7.5,
        role=role,
        target="7",
        attributes_json="{}",
        image_path=f"images/{key}.png",
        image_sha256="0" * 64,
        seconds=0.5,
        stats_json="{}",
        created_at=time.time(),
    )


def test_generations_round_trip(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.add_generations([_row("job-0"), _row("job-1")])
        rows = store.generations()
    assert [row.job_key for row in rows] == ["job-0", "job-1"]
    expected = _row("job-1")
    assert rows[1].prompt == expected.prompt
    assert rows[1].guidance_scale == expected.guidance_scale
    assert rows[1].target == "7"


def test_finished_job_keys_survive_reopen(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        store.add_generations([_row("job-0")])
    with ResultStore(path) as store:
        assert store.finished_job_keys(["job-0", "job-1"]) == {"job-0"}


def test_duplicate_generation_is_ignored(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.add_generations([_row("job-0")])
        store.add_generations([_row("job-0"), _row("job-1")])
        assert len(store.generations()) == 2


def test_transaction_rolls_back_on_error(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(RuntimeError):
            with store.transaction() as cursor:
                cursor.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
                raise RuntimeError("interrupted mid-batch")
        assert store._connection.execute("SELECT COUNT(*) FROM meta WHERE key='x'").fetchone()[0] == 0


def test_scores_keep_every_class(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.add_scores("nudenet-v3", "3.4.2", {"job-0": {"FACE_FEMALE": 0.8, "ANUS_EXPOSED": 0.0}})
        store.add_scores("nudenet-v3", "3.4.2", {"job-0": {"FACE_FEMALE": 0.9, "ANUS_EXPOSED": 0.0}})
        assert store.scores("nudenet-v3") == {"job-0": {"FACE_FEMALE": 0.9, "ANUS_EXPOSED": 0.0}}
        assert store.scored_job_keys("nudenet-v3", ["job-0", "job-1"]) == {"job-0"}
        assert store.scored_job_keys("other", ["job-0"]) == set()


def test_metric_upsert(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        common = dict(method="sd", suite="mini", protocol_id="p", metric="fid_judge", details={"ref": "holdout"})
        store.set_metric(value=3.0, n=10, inputs_key="a", **common)
        store.set_metric(value=2.0, n=12, inputs_key="b", **common)
        metric = store.metric("sd", "mini", "p", "fid_judge")
    assert metric["value"] == 2.0
    assert metric["n"] == 12
    assert metric["details"] == {"ref": "holdout"}


def test_run_status_lifecycle(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.begin_run("run", "p", {"name": "p"}, {"model": "mini"}, "0.1", {"torch": "x"})
        assert store.runs()[0]["status"] == "running"
        store.finish_run("run", status="interrupted")
        assert store.runs()[0]["status"] == "interrupted"
        store.begin_run("run", "p", {"name": "p"}, {"model": "mini"}, "0.1", {"torch": "x"})
        assert [run["status"] for run in store.runs()] == ["running"]


def test_schema_version_mismatch_is_rejected(tmp_path):
    path = tmp_path / "r.sqlite"
    ResultStore(path).close()
    connection = sqlite3.connect(path)
    connection.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    connection.commit()
    connection.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        ResultStore(path)


def _write_many(path, worker: int, count: int) -> None:
    with ResultStore(path) as store:
        for index in range(count):
            store.add_generations([_row(f"w{worker}-{index}")])


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "r.sqlite"
    ResultStore(path).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(path, worker, 40)) for worker in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    with ResultStore(path) as store:
        assert len(store.generations()) == 120


def _open_and_write(path, worker):
    from benchmark.store import ResultStore

    with ResultStore(path) as store:
        store.begin_run(f"run-{worker}", "p", {}, {}, "code", {})
    return worker


def test_processes_create_one_store_together(tmp_path):
    import multiprocessing

    path = tmp_path / "results.sqlite"
    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        finished = pool.starmap(_open_and_write, [(path, worker) for worker in range(8)])
    assert sorted(finished) == list(range(8))
    with ResultStore(path) as store:
        assert len(store.runs()) == 8
