"""One safe home: a second process never damages a memory home (issue #24).

Real processes, as a user runs them: a `sleepwake serve` napping while `sleepwake nap`,
`status`, `facts` and `inject` run beside it; a writer killed with SIGKILL; and the
bad inputs a probe found, each refused with nothing changed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sleepwake.errors import HomeBusyError
from sleepwake.facts import mentions
from sleepwake.homelock import holder
from sleepwake.sources import fingerprint, resolve_model
from sleepwake.store import Store
from test_cli import assert_clean_error, run_cli, write_jsonl
from test_server import Server

FACTS = [
    {"subject": "Ottilie Branstrom", "relation": "lives in", "object": "Trondheim"},
    {"subject": "Ottilie Branstrom", "relation": "works as", "object": "a cartographer"},
    {"subject": "Benedek Szalai", "relation": "lives in", "object": "Debrecen"},
    {"subject": "Wiremu Tane", "relation": "has a dog named", "object": "Juniper"},
]
LATE = {"subject": "Ines Carvalho", "relation": "lives in", "object": "Gdynia"}


def ledger_state(home: Path) -> tuple:
    """Everything the ledger holds, read without changing it."""
    path = home / "memory.sqlite"
    if not path.exists():
        return ()
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return tuple(db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                     for table in ("meta", "facts", "cycles", "pairs", "messages"))
    finally:
        db.close()


# --- the lock, without the model ---------------------------------------------------------

_HOLD = """
import sys, time
from sleepwake.sources import fingerprint, resolve_model
from sleepwake.store import Store
source = resolve_model(None)  # the default model's home, as the CLI opens it
store = Store(sys.argv[1], fingerprint(source), source.name)
cycle = store.begin_cycle("nap")
store.adapter_path(cycle).mkdir(parents=True)
(store.adapter_path(cycle) / "part").write_text("training")
print("held", flush=True)
time.sleep(600)
"""


def hold(home: Path) -> subprocess.Popen:
    """A process that holds `home` with a sleep 'running' in it, as a server mid-nap does."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(home)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_reader_changes_nothing(tmp_path):
    home = tmp_path / "home"
    proc = hold(home)
    source = resolve_model(None)
    fp, name = fingerprint(source), source.name
    try:
        with pytest.raises(HomeBusyError, match=rf"in use by process {proc.pid}\b"):
            Store(home, fp, name)
        who = holder(home)
        assert who is not None and who.pid == proc.pid and who.url is None
        before = ledger_state(home)
        reader = Store(home, fp, name, read_only=True)
        assert reader.mark_interrupted() == []  # the sleep is running elsewhere: nothing changes
        assert [c["status"] for c in reader.cycles()] == ["running"]
        with pytest.raises(Exception, match="read-only"):
            reader.set_meta("k", "v")
        reader.close()
        assert ledger_state(home) == before
        assert (home / "adapters" / "cycle-000001" / "part").read_text() == "training"
    finally:
        proc.kill()
        proc.wait()
    # The kernel dropped the dead process's lock: the next writer takes the home and
    # cleans up after the dead sleep.
    assert holder(home) is None
    store = Store(home, fp, name)
    try:
        assert store.mark_interrupted() == [1]
        assert not (home / "adapters" / "cycle-000001").exists()
    finally:
        store.close()


def test_a_second_claim_in_one_process_shares_the_lock_but_never_cleans_up(tmp_path):
    home = tmp_path / "home"
    first = Store(home, "fp", "model")
    first.begin_cycle("nap")  # a sleep this process is running
    second = Store(home, "fp", "model")
    try:
        assert first.lock.first and not second.lock.first
        assert second.mark_interrupted() == []
        assert [c["status"] for c in second.cycles()] == ["running"]
    finally:
        second.close()
    assert holder(home).pid == os.getpid()  # still held by `first`
    first.close()
    assert holder(home) is None and not (home / "owner.json").exists()


def test_cli_commands_beside_a_non_server_writer_fail_clearly_and_reads_still_work(tmp_path, cache_dir):
    home = tmp_path / "home"
    proc = hold(home)
    try:
        before = ledger_state(home)
        for args in (["inject", "Ines Carvalho | lives in | Gdynia"], ["nap"], ["status"], ["forget", "1"]):
            if args[0] == "forget":
                assert_clean_error(run_cli(*args, home=home), 1, "no fact with id 1")
            else:
                assert_clean_error(run_cli(*args, home=home), 1, f"in use by process {proc.pid}")
        out = run_cli("history", "--json", home=home)
        assert out.returncode == 0 and [c["status"] for c in json.loads(out.stdout)] == ["running"], out.stderr
        assert ledger_state(home) == before
    finally:
        proc.kill()
        proc.wait()


# --- a server napping while the CLI runs beside it ------------------------------------------


def wait_awake(client: httpx.Client, limit: float = 600) -> dict:
    deadline = time.monotonic() + limit
    while (status := client.get("/v1/memory/status").json())["sleeping"] is not None:
        assert time.monotonic() < deadline, "the sleep did not end"
        time.sleep(0.5)
    return status


def test_a_server_nap_survives_cli_commands_run_beside_it(tmp_path, cache_dir):
    home = tmp_path / "home"
    server = Server(home, "--consolidation", "lora", "--sleep-epochs", "2")  # the paper's sleep, from the CLI
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            assert client.post("/v1/memory/facts", json=FACTS).status_code == 201
            assert holder(home).url == server.url
            assert client.post("/v1/memory/nap").status_code == 202
            with ThreadPoolExecutor(max_workers=4) as pool:
                runs = {name: pool.submit(run_cli, *args, home=home) for name, args in [
                    ("nap", ["nap"]), ("status", ["status"]), ("facts", ["facts", "--json"]),
                    ("inject", ["inject", f"{LATE['subject']} | {LATE['relation']} | {LATE['object']}"])]}
                runs = {name: r.result() for name, r in runs.items()}
            still_napping = client.get("/v1/memory/status").json()["sleeping"] is not None
            assert still_napping, "the nap ended before the CLI commands could run beside it"
            # The CLI's nap and inject went to the server, which refused them while it naps.
            assert_clean_error(runs["nap"], 1, "already running", server.url, "nothing changed")
            assert_clean_error(runs["inject"], 1, "running", server.url, "nothing changed")
            assert runs["status"].returncode == 0 and "a nap is running" in runs["status"].stdout, runs["status"]
            listed = json.loads(runs["facts"].stdout)
            assert [f["object"] for f in listed] == [f["object"] for f in FACTS]

            status = wait_awake(client)
            assert status["last_error"] is None and status["last_cycle"]["status"] == "accepted", status
            history = client.get("/v1/memory/history").json()
            assert [(c["kind"], c["status"]) for c in history] == [("nap", "accepted")]
            assert (home / "adapters" / "cycle-000001").is_dir() and not (home / "keyed").exists()

            # Awake again: the CLI's inject goes through the server, which answers with it at once.
            late = run_cli("inject", f"{LATE['subject']} | {LATE['relation']} | {LATE['object']}", home=home)
            assert late.returncode == 0 and "1 fact injected" in late.stdout, late.stderr
            answer = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Where does Ines Carvalho live?"}]}).json()
            assert mentions(answer["choices"][0]["message"]["content"], "Gdynia"), answer
    finally:
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(timeout=120)
    assert holder(home) is None

    # A new process: the ledger is true and every fact is recalled.
    facts = run_cli("facts", "--json", home=home)
    rows = json.loads(facts.stdout)
    assert sorted(f["object"] for f in rows) == sorted(f["object"] for f in [*FACTS, LATE])
    assert {f["object"]: f["where"] for f in rows}["Gdynia"] == "memit"
    history = json.loads(run_cli("history", "--json", home=home).stdout)
    assert [(c["kind"], c["status"]) for c in history] == [("nap", "accepted")]
    out = run_cli("eval", "--facts", str(write_jsonl(tmp_path / "all.jsonl", [*FACTS, LATE])), "--json", home=home)
    report = json.loads(out.stdout)
    missed = [(f["raw_completion"], f["chat_answer"]) for f in report["facts"] if not (f["raw_ok"] or f["chat_ok"])]
    assert not missed, missed
    assert report["chat_recall"] >= 0.8, report


# --- bad input: a clear error, and nothing changed --------------------------------------------


def test_control_characters_in_facts_are_refused_by_the_cli(tmp_path):
    home = tmp_path / "home"  # a NUL cannot be an argument: it comes in a facts file
    nul = write_jsonl(tmp_path / "nul.jsonl", [dict(LATE, subject="Ines\u0000 Carvalho")])
    assert_clean_error(run_cli("inject", "--facts", str(nul), home=home), 1, "control character U+0000")
    esc = "Ines Carvalho | lives in | Gdy\x1b[31mnia"
    assert_clean_error(run_cli("inject", esc, home=home), 1, "control character U+001B")
    assert not home.exists()


def test_a_huge_fact_id_is_refused_without_a_traceback(tmp_path):
    home = tmp_path / "home"
    assert_clean_error(run_cli("forget", "1" + "0" * 30, home=home), 2, "from 1 to")
    assert_clean_error(run_cli("rollback", "9" * 40, home=home), 2, "from 1 to")
    assert not home.exists()


def test_home_that_is_a_file_is_an_error_not_an_empty_memory(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a directory")
    for args in (["facts"], ["history"], ["status"], ["inject", "Ines Carvalho | lives in | Gdynia"]):
        assert_clean_error(run_cli(*args, home=home), 1, "is not a directory")
    assert home.read_text() == "not a directory"


def test_export_to_a_path_that_cannot_be_created_names_it(make_memory, tmp_path):
    mem = make_memory()
    mem.inject("Ines Carvalho | lives in | Gdynia")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception, match=r"cannot write the adapter to .*file/adapter") as err:
        mem.export_adapter(blocker / "adapter")
    assert "Errno" not in str(err.value)
    assert blocker.read_text() == "x"
