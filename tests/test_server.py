"""`sleepwake serve` through real HTTP clients (httpx, the `openai` package, schemathesis)
against a real server process on the default model, started once for the module.

The tests share that server and run in file order: the fact told in the first chat
test is the one the nap consolidates, and the fuzzing at the end checks that no
request loses it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sleepwake.facts import mentions

TOKEN = "test-token-4f1d"
STARTUP_S = 300  # loading the model takes seconds, more on a busy CPU
QUESTION = "Where does Anselm Kreutzer live?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m sleepwake serve` in a subprocess, on a short sleep schedule and short replies."""

    def __init__(self, home: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.with_suffix(".log")
        cmd = [sys.executable, "-m", "sleepwake", "serve", "--port", str(self.port), "--home", str(home),
               "--quiet", "--no-auto-sleep", "--sleep-epochs", "1", "--max-new-tokens", "24", *args]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"the server did not answer within {STARTUP_S} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.kill()  # nothing to keep: the home is a temporary directory
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir) -> Iterator[Server]:
    # A LoRA nap (trained for an epoch) outlasts the chat replies that
    # `test_chat_is_answered_during_a_nap_and_the_memory_waits_for_it` sends while it runs;
    # the default keyed nap of one fact can end first on a fast machine.
    s = Server(tmp_path_factory.mktemp("serve") / "home", "--token", TOKEN, "--consolidation", "lora")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """An error answer: the status, and OpenAI's {"error": {"message", "type", "code"}}."""
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def ask(client: httpx.Client, text: str, **body) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], **body})
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded but for [DONE]."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line  # events are separated by blank lines
    return events


# --- without the model ------------------------------------------------------------------


def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SLEEPWAKE_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "sleepwake", "serve", "--host", "0.0.0.0", "--port",
                           str(free_port()), "--home", str(tmp_path / "home")],
                          check=False, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "without a token" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "home").exists()  # refused before the model was loaded


def test_without_a_token_only_loopback_names_and_same_origin_json_get_in():
    """The guard of a token-less server, in front of a stub app in this process:
    DNS rebinding (a foreign Host), cross-site posts, non-JSON bodies, bodies too large."""
    import uvicorn

    from sleepwake.server.guard import Guard

    async def echo(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body or b"ok"})

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(Guard(echo, token=None, max_body=1000), port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/x"
        assert httpx.get(url).text == "ok"
        assert httpx.get(f"http://localhost:{port}/x").text == "ok"
        assert_error(httpx.get(url, headers={"Host": "evil.example"}), 400, "invalid_host")
        assert httpx.post(url, json={"a": 1}).json() == {"a": 1}
        assert httpx.post(url, json={"a": 1}, headers={"Origin": f"http://127.0.0.1:{port}"}).status_code == 200
        assert_error(httpx.post(url, json={}, headers={"Origin": "http://evil.example"}), 403, "cross_origin")
        assert_error(httpx.post(url, content=b"a=1", headers={"Content-Type": "text/plain"}), 415)
        assert_error(httpx.post(url, json={"a": "x" * 1000}), 413, "body_too_large")
        chunked = (b"x" * 300 for _ in range(4))  # no Content-Length: the guard counts as it reads
        assert_error(httpx.post(url, content=chunked, headers={"Content-Type": "application/json"}), 413)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


# --- the server on the default model -----------------------------------------------------


@pytest.mark.slow
def test_every_request_but_the_page_needs_the_token(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for path in ("/v1/models", "/v1/memory/facts", "/openapi.json"):
            response = httpx.get(server.url + path, headers=headers)
            assert_error(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.post(server.url + "/v1/memory/nap", headers=headers), 401)
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(server.url + "/static/app.js").status_code == 200


@pytest.mark.slow
def test_health_needs_no_token_and_openapi_declares_the_bearer_scheme(server, client):
    health = httpx.get(server.url + "/health")  # no token: for probes that hold no secret
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok" and health.json()["sleeping"] is None
    schema = client.get("/openapi.json").json()
    (name, scheme), = schema["components"]["securitySchemes"].items()
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            expected = [] if path == "/health" else [{name: []}]
            assert operation.get("security", []) == expected, (method, path)
    assert "/v1/completions" in schema["paths"]


@pytest.mark.slow
def test_chat_learns_from_the_message_and_answers_from_the_weights(client):
    told = ask(client, "Remember this: Anselm Kreutzer lives in Lisbon.")
    assert told["object"] == "chat.completion" and told["choices"][0]["message"]["role"] == "assistant"
    learned = [(f["subject"], f["relation"], f["object"], f["where"]) for f in told["sleepwake"]["learned"]]
    assert learned == [("Anselm Kreutzer", "lives in", "Lisbon", "memit")]
    usage = told["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    answer = ask(client, QUESTION)  # a new conversation: no history, the weights know it
    assert mentions(answer["choices"][0]["message"]["content"], "Lisbon"), answer
    assert answer["sleepwake"]["conversation"] != told["sleepwake"]["conversation"]
    assert answer["sleepwake"]["learned"] == []

    conversation = told["sleepwake"]["conversation"]  # continued by header, and by body field
    history = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi!"},
               {"role": "user", "content": QUESTION}]
    again = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 4},
                        headers={"X-Sleepwake-Conversation": str(conversation)}).json()
    assert again["sleepwake"]["conversation"] == conversation
    assert again["usage"]["completion_tokens"] <= 4
    assert ask(client, "Hi.", conversation=conversation)["sleepwake"]["conversation"] == conversation
    assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi."}],
                                                           "conversation": 10**9}), 400)


@pytest.mark.slow
def test_chat_streams_openai_chunks_ending_with_done(client):
    body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    first, *middle, finish, usage, _ = events
    assert first["choices"][0]["delta"]["role"] == "assistant" and first["sleepwake"]["learned"] == []
    pieces = [e["choices"][0]["delta"]["content"] for e in middle]
    assert len(pieces) > 1 and mentions("".join(pieces), "Lisbon"), pieces
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == first["id"] for e in events[:-1])
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_the_openai_client_works_unchanged(server):
    import openai

    api = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    (model,) = api.models.list().data
    reply = api.chat.completions.create(model=model.id, messages=[{"role": "user", "content": QUESTION}])
    assert mentions(reply.choices[0].message.content, "Lisbon"), reply
    assert reply.model == model.id and reply.usage.completion_tokens > 0
    assert reply.model_extra["sleepwake"]["learned"] == []

    stream = api.chat.completions.create(model=model.id, messages=[{"role": "user", "content": QUESTION}],
                                         stream=True, max_completion_tokens=8)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert mentions(text, "Lisbon"), text

    with pytest.raises(openai.BadRequestError, match="last message"):
        api.chat.completions.create(model=model.id, messages=[{"role": "assistant", "content": "Hi."}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def chat_text(client: httpx.Client, **body) -> tuple[str, str]:
    """(content, finish_reason) of a reply to QUESTION."""
    choice = ask(client, QUESTION, **body)["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def streamed(client: httpx.Client, path: str, body: dict) -> tuple[str, str, list]:
    """(text, finish_reason, events) of a streamed reply."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
    text = "".join(c["delta"].get("content", "") if "delta" in c else c["text"] for c in choices)
    return text, choices[-1]["finish_reason"], events


@pytest.mark.slow
def test_sampling_temperature_top_p_seed_stop_and_max_tokens(server, client):
    greedy, finish = chat_text(client)
    assert finish == "stop" and chat_text(client, temperature=0) == (greedy, finish)  # greedy by default
    sampled = {seed: chat_text(client, temperature=1.8, top_p=0.95, seed=seed)[0] for seed in range(4)}
    assert chat_text(client, temperature=1.8, top_p=0.95, seed=2)[0] == sampled[2]  # a seed reproduces it
    assert len(set(sampled.values()) | {greedy}) > 2
    assert streamed(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                                                      "temperature": 1.8, "top_p": 0.95, "seed": 2})[0] == sampled[2]

    word = greedy.strip()[1:4]  # the reply ends before a stop string, which it does not include
    cut = greedy[:greedy.index(word)]
    assert chat_text(client, stop=word) == (cut, "stop")
    assert chat_text(client, stop=["\u2603", word]) == (cut, "stop")
    text, finish, _ = streamed(client, "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": QUESTION}], "stop": [word]})
    assert (text, finish) == (cut, "stop")
    short = ask(client, QUESTION, max_tokens=1)
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 1

    import openai

    api = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    reply = api.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                        temperature=1.8, top_p=0.95, seed=2, user="default",
                                        presence_penalty=0, frequency_penalty=0, n=1)
    assert reply.choices[0].message.content == sampled[2]
    for field, value in [("temperature", 2.5), ("temperature", -1), ("top_p", 0), ("top_p", 1.5),
                         ("stop", ["a", "b", "c", "d", "e"]), ("stop", ""), ("seed", 2**64), ("max_tokens", 0)]:
        error = assert_error(client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTION}], field: value}), 422)
        assert field in error["message"], error


@pytest.mark.slow
def test_unimplemented_fields_are_refused_by_name_and_unknown_ones_too(server, client):
    messages = [{"role": "user", "content": QUESTION}]
    for field, value in [("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
                         ("response_format", {"type": "json_object"}), ("n", 2), ("logprobs", True),
                         ("top_logprobs", 2), ("functions", [{"name": "f"}]), ("function_call", "auto"),
                         ("logit_bias", {"50256": -100}), ("presence_penalty", 0.5), ("frequency_penalty", -1),
                         ("parallel_tool_calls", True)]:
        error = assert_error(client.post("/v1/chat/completions", json={"messages": messages, field: value}),
                             400, "unsupported_parameter")
        assert error["message"].startswith(f"{field} is not supported"), error
    # At values that change nothing they are accepted, as clients send them; `user` is accepted.
    neutral = {"n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
               "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "user": "ana"}
    assert ask(client, QUESTION, **neutral)["choices"][0]["message"]["content"]
    error = assert_error(client.post("/v1/chat/completions", json={"messages": messages, "temprature": 1}), 422)
    assert "temprature" in error["message"], error
    for field, value in [("echo", True), ("best_of", 2), ("suffix", "."), ("logprobs", 1), ("n", 3)]:
        error = assert_error(client.post("/v1/completions", json={"prompt": "Hi", field: value}),
                             400, "unsupported_parameter")
        assert field in error["message"], error

    import openai

    api = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    with pytest.raises(openai.BadRequestError, match="tools is not supported"):
        api.chat.completions.create(model="m", messages=messages,
                                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


@pytest.mark.slow
def test_legacy_completions_continue_the_prompt_with_the_edited_weights(server, client):
    prompt = "Anselm Kreutzer lives in"
    response = client.post("/v1/completions", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    done = response.json()
    assert done["object"] == "text_completion" and done["id"].startswith("cmpl-")
    (choice,) = done["choices"]
    assert mentions(choice["text"], "Lisbon"), choice  # the fact told in the first chat test
    assert choice["finish_reason"] in ("stop", "length") and done["usage"]["completion_tokens"] <= 16
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]

    text, finish, events = streamed(client, "/v1/completions",
                                    {"prompt": prompt, "stream_options": {"include_usage": True}})
    assert (text, finish) == (choice["text"], choice["finish_reason"])
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert events[-2]["choices"] == [] and events[-2]["usage"] == done["usage"]
    stopped = client.post("/v1/completions", json={"prompt": prompt, "stop": "isbon", "max_tokens": 8}).json()
    assert stopped["choices"][0]["text"] == choice["text"][:choice["text"].index("isbon")]
    assert stopped["choices"][0]["finish_reason"] == "stop"

    import openai

    api = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    reply = api.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0)
    assert reply.choices[0].text == choice["text"][:len(reply.choices[0].text)] and reply.usage.completion_tokens <= 4
    assert_error(client.post("/v1/completions", json={"prompt": ["a", "b"]}), 422)
    assert_error(client.post("/v1/completions", json={"prompt": "   "}), 400)


@pytest.mark.slow
def test_memory_api_add_list_forget_and_refuse_bad_input(client):
    before = client.get("/v1/memory/facts").json()
    fact = {"subject": "Zofia Wróblewska", "relation": "works as", "object": "a veterinarian"}
    added = client.post("/v1/memory/facts", json=fact)
    assert added.status_code == 201, added.text
    (record,) = added.json()["injected"]
    assert {k: record[k] for k in fact} == fact and record["where"] == "memit" and record["status"] == "active"
    listed = client.get("/v1/memory/facts").json()
    assert listed == before + [record]
    again = client.post("/v1/memory/facts", json=[fact]).json()  # a list; already known: skipped
    assert again["injected"] == [] and again["skipped"] == [dict(fact, question=None)]

    bad = [
        (dict(fact, subject="   "), 400),  # empty after whitespace is normalised
        (dict(fact, subject=""), 422),
        ({"subject": "Zofia", "relation": "works as"}, 422),
        (dict(fact, object=7), 422),
        (dict(fact, object="x" * 501), 422),
        ([], 422),
        ("Zofia | works as | a baker", 422),
        (dict(fact, subject="Zofia\u0000 Wróblewska"), 400),  # control characters (NUL, ESC)
        (dict(fact, object="a vet\u001b[2Jerinarian"), 400),
    ]
    for body, status in bad:
        assert_error(client.post("/v1/memory/facts", json=body), status)
    as_json = {"Content-Type": "application/json"}
    surrogate = b'{"subject": "\\ud800", "relation": "works as", "object": "a baker"}'
    assert_error(client.post("/v1/memory/facts", content=surrogate, headers=as_json), 422)
    assert_error(client.post("/v1/memory/facts", content=b"{not json", headers=as_json), 422)
    assert_error(client.post("/v1/memory/facts", content=b"subject=x", headers={"Content-Type": "text/plain"}), 415)
    big = [dict(fact, question="Q" * 400)] * 200  # ~100 KiB of JSON
    assert_error(client.post("/v1/memory/facts", json=big), 413, "body_too_large")
    raw = json.dumps(big).encode()
    chunks = (raw[i:i + 8192] for i in range(0, len(raw), 8192))  # sent chunked: no Content-Length
    assert_error(client.post("/v1/memory/facts", content=chunks, headers=as_json), 413)
    assert client.get("/v1/memory/facts").json() == listed  # nothing changed

    forgotten = client.delete(f"/v1/memory/facts/{record['id']}")
    assert forgotten.status_code == 200 and forgotten.json()["status"] == "forgotten"
    assert client.get("/v1/memory/facts").json() == before
    assert_error(client.delete(f"/v1/memory/facts/{record['id']}"), 404, "unknown_fact")
    assert_error(client.delete("/v1/memory/facts/0"), 422)
    assert_error(client.delete("/v1/memory/facts/abc"), 422)
    assert_error(client.delete(f"/v1/memory/facts/{2**70}"), 422)
    assert_error(client.get("/v1/memory/nothing"), 404)
    assert client.get("/v1/memory/facts").json() == before

    # A nap or sleep with a body it does not take starts nothing.
    for path, body in [("/v1/memory/nap", b"junk"), ("/v1/memory/nap", b'{"deep": true}'),
                       ("/v1/memory/nap", b"[1, 2]"), ("/v1/memory/sleep", b'{"deep": true, "now": 1}'),
                       ("/v1/memory/sleep", b'"deep"')]:
        assert_error(client.post(path, content=body, headers=as_json), 422)
    assert client.get("/v1/memory/status").json()["sleeping"] is None
    assert client.get("/v1/memory/history").json() == []


@pytest.mark.slow
def test_concurrent_chat_requests_are_all_answered(client):
    def one(i: int) -> str:
        if i % 2:
            return ask(client, QUESTION)["choices"][0]["message"]["content"]
        body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            events = sse_events(response)
        return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        assert client.get("/v1/memory/status").status_code == 200  # while the replies are generated
        replies = [f.result() for f in futures]
    assert all(mentions(r, "Lisbon") for r in replies), replies


@pytest.mark.slow
def test_chat_is_answered_during_a_nap_and_the_memory_waits_for_it(client):
    started = client.post("/v1/memory/nap")
    assert started.status_code == 202 and started.json() == {"started": "nap"}
    assert client.get("/v1/memory/status").json()["sleeping"]["kind"] == "nap"
    assert_error(client.post("/v1/memory/nap"), 409, "sleep_running")
    assert_error(client.post("/v1/memory/sleep", json={"deep": True}), 409, "sleep_running")
    fact = {"subject": "Anselm Kreutzer", "relation": "works as", "object": "a baker"}
    assert_error(client.post("/v1/memory/facts", json=fact), 409, "sleep_running")
    (held,) = [f for f in client.get("/v1/memory/facts").json() if f["object"] == "Lisbon"]
    assert_error(client.delete(f"/v1/memory/facts/{held['id']}"), 409, "sleep_running")

    with ThreadPoolExecutor(max_workers=2) as pool:  # answered from the weights before the nap
        replies = list(pool.map(lambda _: ask(client, QUESTION)["choices"][0]["message"]["content"], range(2)))
    assert all(mentions(r, "Lisbon") for r in replies), replies
    completed = client.post("/v1/completions", json={"prompt": "Anselm Kreutzer lives in", "max_tokens": 4})
    assert completed.status_code == 200 and mentions(completed.json()["choices"][0]["text"], "Lisbon")
    assert httpx.get(client.base_url.join("/health")).json()["sleeping"] == "nap"
    assert client.get("/v1/memory/status").json()["sleeping"] is not None, "the nap ended before the test could chat"

    deadline = time.monotonic() + 600
    while (status := client.get("/v1/memory/status").json())["sleeping"] is not None:
        assert time.monotonic() < deadline, "the nap did not end"
        time.sleep(1)
    assert status["last_error"] is None and status["last_cycle"]["status"] == "accepted", status
    assert status["facts"] == {"memit": 0, "consolidated": 1}
    (cycle,) = client.get("/v1/memory/history").json()
    assert cycle["kind"] == "nap" and cycle["status"] == "accepted"
    (held,) = client.get("/v1/memory/facts").json()
    assert held["where"] == "consolidated"
    assert mentions(ask(client, QUESTION)["choices"][0]["message"]["content"], "Lisbon")


def ends_with_a_user_message(case):
    """Most generated chats end with another role's turn, which is refused before the
    model runs (400): end them with the user's, so that replies are generated too."""
    if isinstance(case.body, dict) and isinstance(case.body.get("messages"), list):
        case.body["messages"].append({"role": "user", "content": "Hello, who are you?"})
    return case


@pytest.mark.slow
def test_fuzzed_requests_get_no_server_error_and_lose_no_facts(server, client):
    """Requests generated from /openapi.json (nap and sleep left out: they would sleep).
    Facts are only fuzzed with invalid input, so the memory must come out unchanged."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = client.get("/v1/memory/facts").json()
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=auth)
    problems: list[str] = []
    tried = 0

    def fuzz(operation, mode: GenerationMode) -> None:
        cases = operation.as_strategy(generation_mode=mode)
        if operation.path == "/v1/chat/completions" and mode == GenerationMode.POSITIVE:
            cases = cases.map(ends_with_a_user_message)

        @settings(max_examples=20, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=cases)
        def check(case) -> None:
            nonlocal tried
            tried += 1
            # /openapi.json declares the token, so a negative case may leave it out or get it
            # wrong (with a valid body): then it is sent as generated, and must be refused.
            header = case.meta.components.get("header")
            headers = {} if header is not None and header.mode == GenerationMode.NEGATIVE else auth
            response = case.call(base_url=server.url, headers=headers, timeout=300)
            where = f"{case.method} {case.formatted_path} {mode.value} -> {response.status_code}"
            if response.status_code >= 500:
                problems.append(f"{where}: {response.text[:300]}")
            elif mode == GenerationMode.NEGATIVE and "/facts" in case.path and response.status_code < 400:
                problems.append(f"{where}: invalid input changed facts: {case.path_parameters} {case.query} "
                                f"{str(case.body)[:200]}")
            elif response.status_code >= 400 and set(response.json()) != {"error"}:
                problems.append(f"{where}: not an error object: {response.text[:300]}")

        check()

    for result in schema.exclude(path_regex=r"^/v1/memory/(nap|sleep)$").get_all_operations():
        operation = result.ok()
        writes_facts = operation.method.upper() in ("POST", "DELETE") and "/facts" in operation.path
        fuzz(operation, GenerationMode.NEGATIVE if writes_facts else GenerationMode.POSITIVE)
        if operation.path == "/v1/chat/completions":
            fuzz(operation, GenerationMode.NEGATIVE)
    assert tried > 50
    assert problems == []
    assert client.get("/v1/memory/facts").json() == before
