"""Many users on one base model (`sleepwake.users`): real `sleepwake serve` processes
over real HTTP, two users told contradicting facts at the same time, API keys per
user, the CLI's --user, and a restart. The tests share one home and run in file order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_server import Server, assert_error, free_port

from sleepwake.facts import mentions

KEYS = {"alice-key-0123456789": "alice", "bob-key-0123456789ab": "bob", "dflt-key-0123456789a": "default"}
CITY = {"alice": "Trondheim", "bob": "Valparaíso"}
SUBJECT = "Ilse Brandvold"
QUESTION = f"Where does {SUBJECT} live?"
KEY_OF = {u: k for k, u in KEYS.items()}


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sleepwake", *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("users") / "home"


@pytest.fixture(scope="module")
def keyed(home, cache_dir):
    keys = home.with_name("keys.json")
    keys.write_text(json.dumps(KEYS))
    s = Server(home, "--keys", str(keys))
    yield s
    s.stop()


def client(server: Server, user: str | None = None, key: str | None = None) -> httpx.Client:
    key = key or (KEY_OF[user] if user else None)
    return httpx.Client(base_url=server.url, timeout=600,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


def chat(c: httpx.Client, text: str, **body) -> dict:
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], **body})
    assert r.status_code == 200, r.text
    return r.json()


def lives(facts: list[dict]) -> list[str]:
    """Where the facts say people live (a user's message also says who they are)."""
    return [f["object"] for f in facts if f["relation"] == "lives in"]


def reply(d: dict) -> str:
    return d["choices"][0]["message"]["content"]


# --- without the model ------------------------------------------------------------------


def test_user_names_are_checked():
    from sleepwake.errors import InvalidUserError
    from sleepwake.users import check_user, user_home

    assert check_user(None) == "default" and check_user("a.b-C_9") == "a.b-C_9"
    assert user_home("/h", "default") == Path("/h") and user_home("/h", "bob") == Path("/h/users/bob")
    for bad in ["", ".", "..", "../x", "a/b", "a b", "x" * 65, "é", "a\x00", 7]:
        with pytest.raises(InvalidUserError):
            check_user(bad)


def test_malformed_keys_file_is_a_clear_error_and_nothing_starts(tmp_path):
    home = tmp_path / "home"
    cases = {"not json {": "line 1", '{"short": "alice"}': "at least 16", '{"k": 1': "not valid JSON",
             '{"alice-key-0123456789": "../etc"}': "invalid user name", "": "no keys",
             "alice-key-0123456789 alice\nbob-key-0123456789ab\n": "line 2",
             '{"alice-key-0123456789": "a", "alice-key-0123456789": "b"}': "twice"}
    for text, needle in cases.items():
        keys = tmp_path / "keys"
        keys.write_text(text)
        proc = run_cli("serve", "--home", str(home), "--port", str(free_port()), "--keys", str(keys), timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "--keys" in proc.stderr and needle in proc.stderr, (needle, proc.stderr)
    proc = run_cli("serve", "--home", str(home), "--keys", str(tmp_path / "missing"), timeout=120)
    assert proc.returncode == 2 and "cannot read" in proc.stderr, proc.stderr
    keys.write_text(json.dumps(KEYS))
    proc = run_cli("serve", "--home", str(home), "--keys", str(keys), "--token", "t" * 20, timeout=120)
    assert proc.returncode == 2 and "not both" in proc.stderr, proc.stderr
    for bad in ["..", "a/b", "x" * 65]:
        proc = run_cli("--home", str(home), "--user", bad, "facts", timeout=120)
        assert proc.returncode == 2 and "invalid user name" in proc.stderr and "Traceback" not in proc.stderr
    assert not home.exists()  # nothing was made


# --- one server with a key per user ------------------------------------------------------


def test_two_users_with_contradicting_facts_at_once(keyed, home):
    """Alice and Bob tell the server where the same person lives, at the same time; each
    is answered from their own memory, also when they ask at the same time."""
    def tell(user: str) -> dict:
        with client(keyed, user) as c:
            return chat(c, f"Hi! My name is {SUBJECT} and I live in {CITY[user]}.", max_tokens=4)

    with ThreadPoolExecutor(2) as pool:
        told = dict(zip(CITY, pool.map(tell, CITY)))
    for user, d in told.items():
        learned = {(f["subject"], f["relation"], f["object"]) for f in d["sleepwake"]["learned"]}
        assert (SUBJECT, "lives in", CITY[user]) in learned, (user, learned)

    def ask(user: str) -> tuple[str, str, str]:
        with client(keyed, user) as c:
            answer = reply(chat(c, QUESTION, max_tokens=12))
            r = c.post("/v1/completions", json={"prompt": f"{SUBJECT} lives in", "max_tokens": 6})
            assert r.status_code == 200, r.text
            mine = reply(chat(c, "Where do I live?", max_tokens=12))  # "I" is this user's own name
            return answer, r.json()["choices"][0]["text"], mine

    with ThreadPoolExecutor(4) as pool:  # two requests of each user in flight at once
        answers = list(pool.map(ask, ["alice", "bob", "alice", "bob"]))
    for user, texts in zip(["alice", "bob", "alice", "bob"], answers):
        other = CITY["bob" if user == "alice" else "alice"]
        for text in texts:
            assert mentions(text, CITY[user]) and not mentions(text, other), (user, text)
        assert texts[2] == f"You live in {CITY[user]}.", texts[2]

    # Each memory holds its own fact only; the default user's holds none.
    for user in CITY:
        with client(keyed, user) as c:
            facts = c.get("/v1/memory/facts").json()
            assert lives(facts) == [CITY[user]]
            assert c.get("/v1/memory/status").json()["facts"]["memit"] == len(facts)
    with client(keyed, "default") as c:
        assert c.get("/v1/memory/facts").json() == []
        assert not mentions(reply(chat(c, QUESTION, max_tokens=12)), "Trondheim")
    assert (home / "users" / "alice" / "memory.sqlite").is_file()
    assert (home / "users" / "bob" / "memory.sqlite").is_file() and (home / "memory.sqlite").is_file()


def test_a_key_reaches_only_its_own_user(keyed):
    with client(keyed, key="wrong-key-0123456789") as c:
        assert_error(c.get("/v1/memory/facts"), 401, "wrong_token")
    with httpx.Client(base_url=keyed.url) as c:
        assert_error(c.get("/v1/memory/facts?user=alice"), 401, "missing_token")
    with client(keyed, "alice") as c:
        assert lives(c.get("/v1/memory/facts?user=alice").json()) == ["Trondheim"]
        assert_error(c.get("/v1/memory/facts?user=bob"), 403, "wrong_user")
        assert_error(c.get("/v1/memory/status?user=default"), 403, "wrong_user")
        assert_error(c.post("/v1/memory/facts?user=bob", json={"subject": "X Y", "relation": "r", "object": "o"}),
                     403, "wrong_user")
        assert_error(c.post("/v1/memory/nap?user=bob"), 403, "wrong_user")
        assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "user": "bob"}), 403, "wrong_user")
        assert_error(c.post("/v1/completions", json={"prompt": "hi", "user": "bob"}), 403, "wrong_user")
        assert_error(c.get("/v1/memory/facts?user=../bob"), 400, "invalid_request")
        # Naming its own user is the same as naming none.
        same = c.post("/v1/completions", json={"prompt": f"{SUBJECT} lives in", "max_tokens": 6, "user": "alice"})
        assert same.status_code == 200 and mentions(same.json()["choices"][0]["text"], "Trondheim")
    with client(keyed, "bob") as c:  # nothing Alice's key tried reached Bob
        assert lives(c.get("/v1/memory/facts").json()) == ["Valparaíso"]
        assert c.get("/v1/memory/history").json() == []


def test_a_sleep_of_one_user_does_not_block_the_others(keyed):
    with client(keyed, "alice") as alice, client(keyed, "bob") as bob:
        assert alice.post("/v1/memory/nap").status_code == 202
        assert alice.get("/v1/memory/status").json()["sleeping"]["kind"] == "nap"
        assert bob.get("/v1/memory/status").json()["sleeping"] is None
        t0 = time.monotonic()
        answer = reply(chat(bob, QUESTION, max_tokens=12))
        bob_s = time.monotonic() - t0
        still = alice.get("/v1/memory/status").json()["sleeping"]
        assert mentions(answer, "Valparaíso"), answer
        # Alice is answered meanwhile from her weights before the nap.
        during = reply(chat(alice, QUESTION, max_tokens=12))
        assert mentions(during, "Trondheim") and not mentions(during, "Valparaíso"), during
        assert still is not None, f"the nap ended before Bob's reply came back ({bob_s:.1f} s)"
        while (st := alice.get("/v1/memory/status").json())["sleeping"] is not None:
            time.sleep(1)
        assert st["last_error"] is None and st["last_cycle"]["status"] in ("accepted", "rejected"), st
        assert [c["kind"] for c in alice.get("/v1/memory/history").json()] == ["nap"]
        assert bob.get("/v1/memory/history").json() == []
        after = reply(chat(alice, QUESTION, max_tokens=12))
        assert mentions(after, "Trondheim"), after
        assert mentions(reply(chat(bob, QUESTION, max_tokens=12)), "Valparaíso")


# --- after a restart, without keys --------------------------------------------------------


def test_a_restart_keeps_each_users_memory_and_the_cli_reaches_a_user(keyed, home):
    keyed.stop()
    s = Server(home)  # loopback, no token: the request names its user
    try:
        with httpx.Client(base_url=s.url, timeout=600) as c:
            for user, city in CITY.items():  # alice's fact napped, bob's still a MEMIT edit
                d = chat(c, QUESTION, max_tokens=12, user=user)
                assert mentions(reply(d), city), (user, reply(d))
                assert reply(chat(c, "Where do I live?", max_tokens=12, user=user)) == f"You live in {city}."
                facts = c.get(f"/v1/memory/facts?user={user}").json()
                assert lives(facts) == [city]
                r = c.post("/v1/completions", json={"prompt": f"{SUBJECT} lives in", "max_tokens": 6, "user": user})
                assert mentions(r.json()["choices"][0]["text"], city)
            assert c.get("/v1/memory/facts").json() == []  # the default user
            assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "user": ".."}), 400, "invalid_request")
            # The CLI beside the server works through it, for the user it names.
            proc = run_cli("--home", str(home), "--user", "carol", "--quiet", "inject", "Orla Quennell | lives in | Kraków")
            assert proc.returncode == 0, proc.stderr
            assert lives(c.get("/v1/memory/facts?user=carol").json()) == ["Kraków"]
            r = c.post("/v1/completions", json={"prompt": "Orla Quennell lives in", "max_tokens": 6, "user": "carol"})
            assert mentions(r.json()["choices"][0]["text"], "Kraków")
    finally:
        s.stop()
    listed = {u: json.loads(run_cli("--home", str(home), "--user", u, "facts", "--json").stdout)
              for u in ("alice", "bob", "carol", "default")}
    assert {u: lives(fs) for u, fs in listed.items()} == {
        "alice": ["Trondheim"], "bob": ["Valparaíso"], "carol": ["Kraków"], "default": []}
    assert [c["kind"] for c in json.loads(run_cli("--home", str(home), "--user", "alice", "history", "--json").stdout)] \
        == ["nap"]
    assert json.loads(run_cli("--home", str(home), "--user", "bob", "history", "--json").stdout) == []
