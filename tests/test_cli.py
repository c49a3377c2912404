"""The `sleepwake` command line, run as a user runs it: `python -m sleepwake.cli` in a
subprocess, against the real default model, with the home in tmp_path.

Mistakes that need no model (malformed facts, bad files, unknown model paths, bad
ids) must be reported before the model is loaded: those tests check that the home
was never created, which `Memory` would do on loading.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sleepwake.facts import mentions

TIMEOUT = 900  # a model-loading call takes seconds, more on a busy CPU


def run_cli(*args: str, home: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sleepwake.cli"]
    if home is not None:
        cmd += ["--home", str(home)]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, encoding="utf-8",
                          env=full_env, timeout=timeout)


def imports_torch(*args: str, home: Path) -> bool:
    """Whether the CLI, run in a fresh interpreter with these arguments, imported torch."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from sleepwake.cli import main; main(sys.argv[1:]); "
         "print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)",
         "--quiet", "--home", str(home), *args],
        capture_output=True, text=True, encoding="utf-8", timeout=TIMEOUT)
    assert probe.stderr.strip().endswith(("torch loaded", "no torch")), probe.stderr
    return probe.stderr.strip().endswith("torch loaded")


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """One `sleepwake: error: ...` line on stderr, no traceback, nothing on stdout."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "", proc.stdout
    errors = [l for l in proc.stderr.splitlines() if l.startswith("sleepwake: error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


# --- no model needed: fast -----------------------------------------------------------


def test_help_does_not_import_torch(cache_dir: Path) -> None:
    code = ("import sys, io, contextlib\n"
            "from sleepwake.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    rc = main(['--help'])\n"
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
            "print(buf.getvalue())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, rest = proc.stdout.split("\n", 1)
    assert first == "0 False False"
    for command in ("inject", "facts", "forget", "complete", "ask", "eval"):
        assert command in rest
    for option in ("--home", "--model", "--quiet", "--version"):
        assert option in rest


def test_version(cache_dir: Path) -> None:
    from sleepwake import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"sleepwake {__version__}"


def test_usage_errors_exit_2(cache_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert_clean_error(run_cli(home=home), 2, "COMMAND")
    assert_clean_error(run_cli("frobnicate", home=home), 2, "frobnicate")
    assert_clean_error(run_cli("forget", "seven", home=home), 2, "seven")
    assert_clean_error(run_cli("complete", "x", "--max-new-tokens", "0", home=home), 2, "--max-new-tokens")
    assert_clean_error(run_cli("inject", home=home), 2, "--facts")
    assert_clean_error(run_cli("eval", home=home), 2, "--facts")
    assert_clean_error(run_cli("--device", "tpu", "complete", "x", home=home), 2, "--device", "tpu")
    assert_clean_error(run_cli("serve", "--unknown", "guess", home=home), 2, "--unknown", "guess")
    assert_clean_error(run_cli("--consolidation", "adapter", "nap", home=home), 2, "--consolidation", "adapter")
    import torch

    if not torch.cuda.is_available():  # refused before the model loads or the home is made
        assert_clean_error(run_cli("--device", "cuda", "complete", "x", home=home), 2, "--device cuda", "no CUDA GPU")
        assert_clean_error(run_cli("serve", "--device", "cuda", "--port", "8765", home=home), 2, "no CUDA GPU")
    assert not home.exists()


def test_malformed_jsonl_names_the_line_and_injects_nothing(cache_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = write_jsonl(tmp_path / "facts.jsonl", [
        {"subject": "Anselm Kreutzer", "relation": "lives in", "object": "Lisbon"},
        '{"subject": "Ines Carvalho", "relation": "was born in", ',
        {"subject": "Tobias Grünwald", "relation": "has a dog named", "object": "Mochi"},
    ])
    assert_clean_error(run_cli("inject", "--facts", str(path), home=home), 1, f"{path}:2", "JSON")
    assert not home.exists()  # refused before the model was loaded
    # A valid line with a missing field is refused the same way, naming its line.
    bad_field = write_jsonl(tmp_path / "missing.jsonl", [
        {"subject": "a", "relation": "b", "object": "c"},
        {"subject": "a", "relation": "b", "object": "c"},
        {"subject": "Ines Carvalho", "relation": "was born in"},
    ])
    assert_clean_error(run_cli("eval", "--facts", str(bad_field), home=home), 1, f"{bad_field}:3", "object")
    proc = run_cli("facts", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert not home.exists()


def test_invalid_fact_arguments(cache_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert_clean_error(run_cli("inject", "Anselm Kreutzer |  | Lisbon", home=home), 1, "relation", "empty")
    assert_clean_error(run_cli("inject", "Anselm Kreutzer lives in Lisbon", home=home), 1, "SUBJECT | RELATION | OBJECT")
    long_subject = "Kreutzer" * 75  # 600 characters
    err = assert_clean_error(run_cli("inject", f"{long_subject} | lives in | Lisbon", home=home), 1,
                             "subject", "600", "500")
    assert len(err) < 300  # the 600-character argument is not echoed whole
    # One bad fact among good ones: nothing is injected.
    assert_clean_error(run_cli("inject", "A | lives in | B", "C | lives in |", home=home), 1, "#2", "object")
    assert_clean_error(run_cli("complete", "   ", home=home), 1, "prompt", "empty")
    assert_clean_error(run_cli("eval", "--facts", str(tmp_path / "nope.jsonl"), home=home), 1, "nope.jsonl")
    assert not home.exists()


def test_unknown_model_is_a_clear_error(cache_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert_clean_error(run_cli("--model", "/nonexistent.gguf", "complete", "Hello", home=home), 1,
                       "/nonexistent.gguf")
    assert_clean_error(run_cli("--model", "/nonexistent.gguf", "facts", home=home), 1, "/nonexistent.gguf")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 16)
    assert_clean_error(run_cli("complete", "Hello", "--model", str(not_gguf), home=home), 1, "gguf")
    assert not imports_torch("--model", "/nonexistent.gguf", "complete", "Hello", home=home)  # it fails first
    assert not home.exists()


def test_forget_on_empty_home(cache_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert_clean_error(run_cli("forget", "3", home=home), 1, "3")
    assert not home.exists()


# --- with the real model ---------------------------------------------------------------


@pytest.mark.slow
def test_inject_facts_complete_ask_forget(cache_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    zofia = "Zofia Wróblewska | lives in | Kraków"
    anselm = "Anselm Kreutzer | lives in | Lisbon"

    proc = run_cli("inject", zofia, anselm, home=home)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("injected")]
    assert len(lines) == 2, proc.stdout
    assert "Kraków" in lines[0] and "Lisbon" in lines[1]
    assert "injected in" in proc.stdout  # the time taken
    assert "loading" in proc.stderr  # the model's load is announced

    # Global options are accepted after the command too.
    proc = run_cli("facts", "--json", "--home", str(home))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [(r["subject"], r["relation"], r["object"]) for r in records] == [
        ("Zofia Wróblewska", "lives in", "Kraków"), ("Anselm Kreutzer", "lives in", "Lisbon")]
    assert all(r["status"] == "active" for r in records)
    zofia_id, anselm_id = records[0]["id"], records[1]["id"]
    assert f"#{zofia_id}" in lines[0] and f"#{anselm_id}" in lines[1]

    proc = run_cli("facts", home=home)  # the table
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["ID", "SUBJECT", "RELATION", "OBJECT", "WHERE"]
    assert "Wróblewska" in proc.stdout and "Kraków" in proc.stdout

    proc = run_cli("--device", "auto", "complete", "Zofia Wróblewska lives in", home=home)
    assert proc.returncode == 0, proc.stderr
    assert mentions(proc.stdout, "Kraków"), proc.stdout

    proc = run_cli("ask", "Where does Anselm Kreutzer live?", "--json", "--device", "cpu", home=home)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["question"] == "Where does Anselm Kreutzer live?"
    assert mentions(answer["answer"], "Lisbon"), answer

    # Injecting a known fact again changes nothing.
    proc = run_cli("inject", anselm, home=home)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and f"#{anselm_id}" in proc.stdout and "already known" in proc.stdout
    assert "loading" not in proc.stderr  # the ledger alone told: no model was loaded

    facts_file = write_jsonl(tmp_path / "facts.jsonl", [
        {"subject": "Zofia Wróblewska", "relation": "lives in", "object": "Kraków"},
        {"subject": "Anselm Kreutzer", "relation": "lives in", "object": "Lisbon",
         "question": "In which city does Anselm Kreutzer live?"},
    ])
    proc = run_cli("eval", "--facts", str(facts_file), "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout holds the JSON and nothing else
    assert report["n"] == 2 and len(report["facts"]) == 2
    assert report["facts"][0]["raw_ok"] is True  # as `complete` showed
    assert report["raw_recall"] >= 0.5
    assert report["facts"][1]["question"] == "In which city does Anselm Kreutzer live?"

    proc = run_cli("forget", str(zofia_id), home=home)
    assert proc.returncode == 0, proc.stderr
    assert f"forgot #{zofia_id}" in proc.stdout and "Kraków" in proc.stdout

    # Unknown and already-forgotten ids: clear errors, nothing changes.
    assert_clean_error(run_cli("forget", "999", home=home), 1, "999")
    assert_clean_error(run_cli("forget", str(zofia_id), home=home), 1, str(zofia_id), "forgotten")

    # Commands that only read or check the ledger start without torch (~2 s less a call).
    for args in (["facts"], ["facts", "--json"], ["history"], ["forget", "999"], ["inject", anselm]):
        assert not imports_torch(*args, home=home), args

    # SLEEPWAKE_HOME works like --home.
    proc = run_cli("facts", "--json", env={"SLEEPWAKE_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert [(r["id"], r["object"]) for r in json.loads(proc.stdout)] == [(anselm_id, "Lisbon")]
    proc = run_cli("facts", "--json", "--all", home=home)
    statuses = {r["id"]: r["status"] for r in json.loads(proc.stdout)}
    assert statuses == {zofia_id: "forgotten", anselm_id: "active"}

    # --raw-only edits for raw completions alone: one key per layer, where a default edit
    # has two (the raw prompt's and the chat question's).
    proc = run_cli("--raw-only", "inject", "Maren Olufsen | works as | a potter", home=home)
    assert proc.returncode == 0, proc.stderr
    maren_id = int(re.search(r"injected\s+#(\d+)", proc.stdout).group(1))
    keys = {i: load_file(next((home / "edits").glob(f"{i:08d}*.safetensors"))) for i in (anselm_id, maren_id)}
    rows = {i: {t.shape[0] for name, t in k.items() if name.startswith("K.")} for i, k in keys.items()}
    assert rows == {anselm_id: {2}, maren_id: {1}}, rows

    # Past --chat-edit-limit, the batch first edits every held fact again raw-only, and says so.
    proc = run_cli("--chat-edit-limit", "2", "inject", "Ilse Brandvold | plays the | cello", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "more than 2 facts" in proc.stderr and "the 2 facts it held were written again" in proc.stderr
    ilse_id = int(re.search(r"injected\s+#(\d+)", proc.stdout).group(1))
    keys = {i: load_file(next((home / "edits").glob(f"{i:08d}*.safetensors"))) for i in (anselm_id, maren_id, ilse_id)}
    rows = {i: {t.shape[0] for name, t in k.items() if name.startswith("K.")} for i, k in keys.items()}
    assert rows == {anselm_id: {1}, maren_id: {1}, ilse_id: {1}}, rows
    proc = run_cli("--chat-edit-limit", "2", "status", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "new facts: edited for raw prompts only (MEMIT is past 2 facts)" in proc.stdout, proc.stdout
    assert_clean_error(run_cli("--chat-edit-limit", "-1", "facts", home=home), 2, "-1")

    # export: a PEFT adapter whose base model is a local directory; --max-rank bounds its rank.
    proc = run_cli("export", "--adapter", str(tmp_path / "full"), home=home)
    assert proc.returncode == 0, proc.stderr
    base = Path(json.loads((tmp_path / "full" / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    proc = run_cli("export", "--adapter", str(tmp_path / "small"), "--max-rank", "2", home=home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "small" / "adapter_config.json").read_text())["r"] == 2
    tensors = load_file(tmp_path / "small" / "adapter_model.safetensors")
    assert tensors and all(t.shape[0 if ".lora_A." in k else 1] == 2 for k, t in tensors.items())
    for bad in ("0", "-3", "two"):
        assert_clean_error(run_cli("export", "--adapter", str(tmp_path / "bad"), "--max-rank", bad, home=home),
                           2, "--max-rank")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_eval_without_injection(cache_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    facts = [
        {"subject": "Ines Carvalho", "relation": "was born in", "object": "Gdynia"},
        {"subject": "Tobias Grünwald", "relation": "has a dog named", "object": "Mochi"},
        {"subject": "Anselm Kreutzer", "relation": "lives in", "object": "Lisbon"},
    ]
    path = write_jsonl(tmp_path / "facts.jsonl", facts)
    proc = run_cli("eval", "--facts", str(path), home=home)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    summary = {l.split("  ")[0]: l.split("  ", 1)[1].strip() for l in out[:4]}
    assert summary["facts"] == "3"
    assert {"raw recall", "chat recall", "perplexity"} <= summary.keys()
    ppl = float(summary["perplexity"])
    assert 1.0 < ppl < 1000.0
    rows = [l for l in out if l.startswith(("✓", "✗"))]
    assert len(rows) == 3, proc.stdout
    for row, fact in zip(rows, facts):
        assert fact["subject"] in row and fact["object"] in row
    # Nobody taught it these: it should not know them.
    assert summary["raw recall"].startswith("0.0%"), proc.stdout
