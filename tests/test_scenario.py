"""End to end: a conversation of 15 messages through the HTTP server tells 10 facts
about the user and two other people; they appear in the memory; after a deep sleep
and a server restart, chat questions in a new conversation are answered from the
weights, and the web page lists the facts.

The conversation is tests/data/scenario.json (also used by `benchmarks/talk.py scenario`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from test_server import Server
from test_web import CHROMIUM, CHROMIUM_ARGS, VIEWPORT

from sleepwake.facts import Fact, mentions

pytestmark = [pytest.mark.slow, pytest.mark.scenario]  # not in `make test`: ~8 min; `make scenario`

SCENARIO = json.loads((Path(__file__).parent / "data" / "scenario.json").read_text(encoding="utf-8"))
EXPECTED = [Fact.from_dict(d) for d in SCENARIO["expected"]]


def chat(client: httpx.Client, messages: list[dict], conversation: int | None) -> dict:
    headers = {"X-Sleepwake-Conversation": str(conversation)} if conversation else {}
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 16}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def recall(client: httpx.Client) -> tuple[float, list[tuple[str, str]]]:
    answers = [(f.chat_question(), chat(client, [{"role": "user", "content": f.chat_question()}], None)
                ["choices"][0]["message"]["content"]) for f in EXPECTED]
    ok = [mentions(a, f.object) for f, (_, a) in zip(EXPECTED, answers)]
    return sum(ok) / len(ok), [qa for qa, good in zip(answers, ok) if not good]


def test_a_conversation_is_learned_survives_sleep_and_restart_and_shows_on_the_page(tmp_path, cache_dir):
    home = tmp_path / "home"
    server = Server(home)
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            history: list[dict] = []
            conversation = None
            for text in SCENARIO["messages"]:
                history.append({"role": "user", "content": text})
                out = chat(client, history, conversation)
                conversation = out["sleepwake"]["conversation"]
                history.append(out["choices"][0]["message"])
            stored = {(f["subject"], f["relation"], f["object"]) for f in client.get("/v1/memory/facts").json()}
            missing = [f for f in EXPECTED if (f.subject, f.relation, f.object) not in stored]
            assert not missing, missing  # every fact told was extracted and written in

            assert client.post("/v1/memory/sleep", json={"deep": True}).status_code == 202
            deadline = time.monotonic() + 600
            while client.get("/v1/memory/status").json()["sleeping"] is not None:
                assert time.monotonic() < deadline, "the deep sleep did not end"
                time.sleep(1)
            cycle = client.get("/v1/memory/history").json()[-1]
            assert (cycle["kind"], cycle["status"]) == ("deep", "accepted"), cycle
            assert cycle["report"]["exchanges"] == len(SCENARIO["messages"])  # the conversation was curated
    finally:
        server.stop()

    server = Server(home)  # a restart: the weights are rebuilt from the home
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            score, wrong = recall(client)
            print(f"scenario: chat recall after deep sleep and restart {score:.2f}; wrong: {wrong}")
            assert score >= 0.8, wrong
            facts = client.get("/v1/memory/facts").json()
            assert {f["where"] for f in facts} <= {"memit", "consolidated"}
            assert any(f["where"] == "consolidated" for f in facts)

        if not CHROMIUM.exists():
            pytest.skip("needs Debian's chromium (scripts/setup.sh --test installs it)")
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(server.url + "/")
                for f in EXPECTED:
                    row = page.locator("#facts tr", has_text=f"{f.subject} · {f.relation} · {f.object}")
                    expect(row).to_have_count(1)
                page.screenshot(path=str(tmp_path / "scenario.png"))
            finally:
                browser.close()
    finally:
        server.stop()
