"""`Assistant`: a `Memory` in conversation — it learns from what the user says, and
sleeps in the background.

    from sleepwake import Assistant, Memory
    bot = Assistant(Memory(home="~/.sleepwake"))
    turn = bot.turn("Hi, I'm Ana and I live in Porto.")
    print(turn.learned)            # the facts injected from the message, before the reply
    for piece in turn.stream():    # the reply, token by token
        print(piece, end="")

Non-blocking sleep (the paper's sleep stops the model, §7). A nap or deep sleep
changes the weights many times while it trains and validates, so it runs on a private
copy of the model (`Memory.apart`) while the assistant answers from the loaded one,
with the weights as they were before it (`Memory.snapshot`); when the sleep ends, the
next turn uses the new weights. Other users' assistants on the same loaded model
(`sleepwake.users`) go on meanwhile: each takes the model's lock in turn
(`LoadedModel.lock`) and makes its own weights live (`Memory.activate`).
Facts told during a sleep are stored with their message and injected when it ends
(or at the next start, if the process dies first): nothing said is lost.

Questions about the user and the people they named are answered from the weights
through the memory's own questions (`questions`, `replies`): "Where do I live?" is
asked as "Where does Ana Kowalczyk live?", the question her fact was edited with, and
a question about her that nothing stored answers is answered without her edits
(`unknown="mask"`) or declined (`unknown="decline"`), never by her edit taking over.

The CLI's `sleepwake chat` and the HTTP server are both thin layers over this class.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from jinja2 import TemplateError

from sleepwake.decoding import GREEDY, Decoding, Sampling, first_stop, stop_prefix
from sleepwake.errors import InvalidFactError, InvalidRequestError, SleepRunningError, SleepwakeError
from sleepwake.extract import (
    ConversationState,
    Extractor,
    extract_turn,
    is_list_relation,
    join_items,
    make_extractor,
    split_items,
)
from sleepwake.facts import MAX_FIELD_CHARS, Fact
from sleepwake.inference import chat_text, encode
from sleepwake.memory import MAX_PROMPT_CHARS, FactLike, InjectResult, Memory, check_text
from sleepwake.questions import Known, Lookup, Plan, Unknown, understand
from sleepwake.replies import answers, declined
from sleepwake.sleep.cycle import CycleReport
from sleepwake.store import FactRecord

MAX_HISTORY_TOKENS = 1024
"""Earlier turns beyond this many prompt tokens are left out (the newest message always stays)."""
CHAINED_SLEEPS = 2
"""Sleeps one background sleep may start after it, at once (`Assistant._run_sleep`)."""
_ROLES = ("system", "user", "assistant")
UNKNOWN = ("mask", "decline")
"""How a question about known people that nothing stored answers is answered: by the
model with their memories taken out (`Memory.without`), or with "I don't know"."""


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as the OpenAI API has them: a non-empty list of {"role", "content"}
    ending with the user's turn. A plain string is one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise InvalidFactError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidFactError(f"message #{i + 1} must be an object with string 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise InvalidFactError(f"message #{i + 1} has role {m['role']!r}; expected one of {', '.join(_ROLES)}")
        bad = next((c for c in m["content"] if c not in "\n\r\t" and unicodedata.category(c) in ("Cc", "Cs")), None)
        if bad is not None:
            raise InvalidFactError(f"message #{i + 1} contains the control character U+{ord(bad):04X}")
        if len(m["content"]) > MAX_PROMPT_CHARS:
            raise InvalidFactError(
                f"message #{i + 1} is {len(m['content'])} characters long; the limit is {MAX_PROMPT_CHARS}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise InvalidFactError("the last message must be a non-empty user message")
    return out


@dataclass(kw_only=True)
class Reply:
    """Generated text, read as a stream. It holds the model (or, during a sleep, the
    frozen copy) until it has been read or closed."""

    prompt_tokens: int
    _decoding: Decoding = field(repr=False)
    _finish: Callable[[Any, bool], None] = field(repr=False)
    reply: str = ""
    done: bool = False

    @property
    def completion_tokens(self) -> int:
        return self._decoding.tokens

    @property
    def finish_reason(self) -> str | None:
        """"stop" (the end of the turn, or a stop string) or "length"; None until read whole."""
        return self._decoding.finish_reason if self.done else None

    def stream(self) -> Iterator[str]:
        """The text, piece by piece."""
        if self.done:
            raise RuntimeError("this reply was already read")
        try:
            for piece in self._decoding:
                self.reply += piece
                yield piece
        finally:
            self.done = True
            self._finish(self, True)

    def text(self) -> str:
        """The whole text."""
        for _ in self.stream():
            pass
        return self.reply

    def close(self) -> None:
        """Give the model back without reading the text."""
        if not self.done:
            self.done = True
            self._finish(self, False)


@dataclass(kw_only=True)
class Turn(Reply):
    """One exchange: what was learned from the user's message, then the reply as a
    stream, which is stored in the conversation when read."""

    conversation: int
    learned: list[FactRecord]  # injected from the message, before the reply
    pending: list[Fact]  # extracted during a sleep: injected when it ends


class Assistant:
    """A `Memory` that chats, learns from the user's messages and sleeps in the background."""

    def __init__(self, memory: Memory, *, extractor: Extractor | str = "rules", learn: bool = True,
                 auto_sleep: bool | None = None, max_new_tokens: int = 96, unknown: str = "mask") -> None:
        if unknown not in UNKNOWN:
            raise ValueError(f"unknown must be one of {', '.join(UNKNOWN)}, not {unknown!r}")
        self.memory = memory
        self.unknown = unknown
        self._settings = {"extractor": extractor, "learn": learn, "auto_sleep": auto_sleep,
                          "max_new_tokens": max_new_tokens, "unknown": unknown}  # for `for_user`
        # "rules" (the default: the default model is small) or "model": the loaded model
        # itself is asked for JSON triples, for capable models.
        self.extractor = extractor if not isinstance(extractor, str) else make_extractor(
            extractor, generate=lambda prompt: memory.ask(prompt, max_new_tokens=256))
        self.learn = learn
        self.auto_sleep = memory.config.auto_sleep if auto_sleep is None else auto_sleep
        if memory.config.auto_sleep:  # the assistant sleeps in the background, not inside `inject`
            memory.config = replace(memory.config, auto_sleep=False)
        self.max_new_tokens = max_new_tokens
        self.lm = memory.lm  # the loaded model, which other users' assistants may share
        self.model = memory.model  # what replies run on: the loaded model's network (PyTorch) or itself (MLX)
        # This user's memory and store. Not an RLock: it is released by another thread than
        # took it (the sleep thread, or whichever thread finishes reading a streamed reply).
        # The model itself is `lm.lock`'s, taken after this one.
        self._lock = threading.Lock()
        self._serving: Callable[[], None] | None = None  # while a sleep runs: puts the weights before it back
        self._state = threading.Lock()  # guards the fields below
        self._sleep: threading.Thread | None = None
        self._sleep_kind: str | None = None
        self._sleep_started: float | None = None
        self.last_cycle: CycleReport | None = None
        self.last_error: str | None = None
        self.conversation = ConversationState(user_name=memory.store.meta("user_name"))
        with self._lock:
            self._learn_unlearned()

    def for_user(self, user: str) -> "Assistant":
        """An assistant like this one for another user of the same home, on the same
        loaded model (see `sleepwake.users`): that user's memory is opened, or made."""
        mem = self.memory
        other = Memory(self.lm, home=mem.root, user=user, config=replace(mem.config, auto_sleep=False),
                       cache_dir=mem.cache_dir, progress=mem.progress, backend=mem.backend)
        try:
            return Assistant(other, **{**self._settings, "auto_sleep": self.auto_sleep})
        except BaseException:
            other.close()
            raise

    # --- conversation --------------------------------------------------------------

    def turn(self, messages: str | list[dict[str, str]], *, conversation: int | None = None,
             max_new_tokens: int | None = None, learn: bool | None = None,
             sampling: Sampling = GREEDY) -> Turn:
        """Learn from the last user message, then prepare the reply (read it with
        `Turn.stream()` or `Turn.text()`). `conversation` continues a stored one;
        `sampling` chooses the reply's tokens (greedy by default)."""
        msgs = check_messages(messages)
        n = self._length(max_new_tokens)
        _check_sampling(sampling)
        store = self.memory.store
        if conversation is None:
            conversation = store.new_conversation()
        elif isinstance(conversation, bool) or not isinstance(conversation, int) \
                or not store.has_conversation(conversation):
            raise InvalidFactError(f"no conversation with id {conversation!r}")
        text = msgs[-1]["content"]
        facts = extract_turn("user", text, self.conversation, self.extractor) if (
            self.learn if learn is None else learn) else []
        learned, pending = self._remember(conversation, text, facts)
        known = Known.of(r.fact for r in store.facts())
        plan = understand(text, known, self.conversation.subject)
        ids = self._prompt(msgs)
        model, release = self._model()
        decoding = self._reply(model, plan, known, ids, n, sampling)

        def finish(t: Reply, read: bool) -> None:
            if isinstance(decoding, _Composed):
                decoding.close()  # a masked reply puts the weights back before the model is released
            release()
            if not read:
                return
            store.add_message(conversation, "assistant", t.reply)
            if learned and self.auto_sleep:
                self._sleep_if_due()

        return Turn(conversation=conversation, learned=learned, pending=pending, prompt_tokens=len(ids),
                    _decoding=decoding, _finish=finish)

    def complete(self, prompt: str, *, max_new_tokens: int | None = None, sampling: Sampling = GREEDY) -> Reply:
        """A raw continuation of `prompt` by the edited model (the MEMIT pathway, as
        `Memory.complete`, and the same tokens when greedy), read like a turn's reply.
        Nothing is learned or stored; during a sleep it reads the weights before it."""
        prompt = check_text(prompt, "prompt")
        n = self._length(max_new_tokens)
        _check_sampling(sampling)
        ids = encode(self.memory.tokenizer, self.memory.as_written(prompt))
        model, release = self._model()
        return Reply(prompt_tokens=len(ids), _decoding=Decoding(model, self.memory.tokenizer, ids, n, sampling),
                     _finish=lambda _reply, _read: release())

    def _length(self, max_new_tokens: int | None) -> int:
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequestError(f"max_new_tokens must be a positive integer, got {n!r}")
        return n

    def _reply(self, model: Any, plan: Plan | None, known: Known, ids: list[int], n: int,
               sampling: Sampling) -> Decoding | _Composed:
        """The reply: the model on the chat, or for a question about the user or a known
        person (`plan`), the memory's answers to its own questions."""
        tok = self.memory.tokenizer
        if plan is None or isinstance(plan, Unknown) and not plan.masked and self.unknown == "mask":
            return Decoding(model, tok, ids, n, sampling)
        if isinstance(plan, Unknown):
            if self.unknown == "decline" or model is not self.memory.model:  # a sleep's frozen copy cannot mask
                return _Composed(iter([declined(plan.who)]), tok, n, sampling.stop)

            def masked() -> Iterator[str]:
                with self.memory.without(plan.masked):
                    yield from Decoding(model, tok, ids, n, sampling)

            return _Composed(masked(), tok, n, sampling.stop)

        def prompt(question: str) -> list[int]:
            return encode(tok, chat_text(tok, question), chat=True)

        if isinstance(plan, Lookup) and not plan.who.me and not plan.who.kind and len(plan.asks) == 1:
            subject, relation = plan.asks[0]  # someone named, one relation: the model's answer as it is, streamed
            return Decoding(model, tok, prompt(known.questions[subject][relation]), n, sampling)

        whole = replace(sampling, stop=())  # the stop strings cut the reply, not the answers it is made of

        def ask(question: str) -> str:
            return "".join(Decoding(model, tok, prompt(question), n, whole)).strip()

        return _Composed(answers(plan, ask, known), tok, n, sampling.stop)

    def say(self, message: str, **kwargs: Any) -> Turn:
        """One user message, its reply read whole."""
        t = self.turn(message, **kwargs)
        t.text()
        return t

    def _prompt(self, msgs: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat so far, oldest turns dropped to fit `MAX_HISTORY_TOKENS`.
        A single question gives exactly the prompt `Memory.ask` uses (and MEMIT edits)."""
        system = [m for m in msgs[:1] if m["role"] == "system"]
        rest = msgs[len(system):]
        for start in range(len(rest)):
            window = rest[start:]
            if window[0]["role"] != "user" and start < len(rest) - 1:
                continue
            ids = self._encode(system + window)
            if len(ids) <= MAX_HISTORY_TOKENS or start == len(rest) - 1:
                return ids
        raise AssertionError("unreachable")

    def _encode(self, msgs: list[dict[str, str]]) -> list[int]:
        tok = self.memory.tokenizer
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except TemplateError:  # templates that refuse a system turn: fold it into the first user turn
                text = tok.apply_chat_template(_fold_system(msgs), tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        lines = [f"{'Question' if m['role'] == 'user' else 'Answer'}: {m['content']}"
                 for m in msgs if m["role"] != "system"]
        text = "\n".join(lines) + "\nAnswer:"  # the Q/A frame `chat_text` uses for base models
        return list(tok(text)["input_ids"])

    def _model(self) -> tuple[Any, Any]:
        """The model a reply is generated with, and how to release it: the loaded model
        under its lock, with this user's weights live — during a sleep, those before it."""
        while True:
            with self._state:
                serving = self._serving
            if serving is not None:
                return self._hold(serving, self.lm.lock.release)
            if self._acquire_live():
                def release() -> None:
                    self.lm.lock.release()
                    self._lock.release()

                try:
                    return self._hold(self.memory.activate, release)
                except BaseException:
                    self._lock.release()
                    raise
            time.sleep(0.01)  # a sleep is starting: its snapshot is on the way

    def _hold(self, activate: Callable[[], None], release: Callable[[], None]) -> tuple[Any, Any]:
        """Take the model's lock, `activate` weights, and hand the hold to the reply."""
        self.lm.lock.acquire()
        try:
            activate()
        except BaseException:
            self.lm.lock.release()
            raise
        self.lm.lock.detach()  # released by whichever thread ends the reply
        return self.model, release

    def _acquire_live(self) -> bool:
        """Take the lock on the live model, unless a sleep holds it: then False at once
        (rather than waiting for the whole sleep)."""
        while self.sleeping() is None:
            if self._lock.acquire(timeout=0.05):
                if self.sleeping() is None:
                    return True
                self._lock.release()
        return False

    # --- learning -------------------------------------------------------------------

    def _merged(self, facts: list[Fact]) -> list[Fact]:
        """List-valued facts ("speaks", "likes", ...) join the items already known, so
        that a new item adds to the object instead of replacing it ("English and French")."""
        known = {r.fact.key: r.fact for r in self.memory.store.facts()}
        out: dict[tuple[str, str], Fact] = {}
        for f in facts:
            prev = out.get(f.key) or known.get(f.key)
            if prev is not None and is_list_relation(f.relation):
                items = split_items(prev.object)
                if f.object.casefold() not in {i.casefold() for i in items}:
                    joined = join_items([*items, f.object])
                    f = Fact(f.subject, f.relation, joined) if len(joined) <= MAX_FIELD_CHARS else f
                else:
                    f = prev
            out[f.key] = f
        return list(out.values())

    def _remember(self, conversation: int, text: str, facts: list[Fact]) -> tuple[list[FactRecord], list[Fact]]:
        """Store the user's message; inject its facts now, or after the running sleep."""
        store = self.memory.store
        if self.conversation.user_name and self.conversation.user_name != store.meta("user_name"):
            store.set_meta("user_name", self.conversation.user_name)
        if not facts:
            store.add_message(conversation, "user", text)
            return [], []
        msg = store.add_message(conversation, "user", text, facts, learned=False)
        if not self._acquire_live():  # a sleep runs: its end injects them
            return [], facts
        try:
            result = self.memory.inject(self._merged(facts))
            store.mark_learned([msg])
            return result.records, []
        finally:
            self._lock.release()

    def _learn_unlearned(self) -> bool:
        """Inject facts that messages told during a sleep (or before a crash); whether any were."""
        waiting = self.memory.store.unlearned()
        if not waiting:
            return False
        facts = [f for _, fs in waiting for f in fs]
        self.memory.inject(self._merged(facts))
        self.memory.store.mark_learned([i for i, _ in waiting])
        return True

    # --- memory, guarded ---------------------------------------------------------------

    def _changing(self) -> Any:
        """The lock for a change to the memory; refused at once while a sleep runs."""
        if self.sleeping() is not None:
            raise SleepRunningError(f"a {self.sleeping()} is running; the memory can change when it ends")
        return self._lock

    def facts(self) -> list[FactRecord]:
        return self.memory.store.facts()

    def add_facts(self, facts: FactLike | Sequence[FactLike]) -> InjectResult:
        with self._changing():
            return self.memory.inject(facts)

    def forget(self, fact_id: int) -> FactRecord:
        with self._changing():
            return self.memory.forget(fact_id)

    def status(self, measure_perplexity: bool = False) -> dict[str, Any]:
        """`Memory.status()` plus the running sleep. Perplexity (a second of compute)
        only on request, and never during a sleep: the live weights are mid-change."""
        with self._state:
            kind, started = self._sleep_kind, self._sleep_started
        if measure_perplexity and self._acquire_live():
            try:
                out = self.memory.status()
            finally:
                self._lock.release()
        else:
            out = self.memory.status(measure_perplexity=False)
        out["sleeping"] = None if kind is None else {"kind": kind, "since": started}
        out["last_cycle"] = self.last_cycle.to_dict() if self.last_cycle else None
        out["last_error"] = self.last_error
        return out

    def history(self) -> list[dict]:
        return self.memory.history()

    # --- sleep -------------------------------------------------------------------------

    def sleeping(self) -> str | None:
        """The kind of sleep running now ("nap" | "deep"), or None."""
        with self._state:
            return self._sleep_kind

    def start_sleep(self, kind: str = "nap") -> None:
        """Start a nap or deep sleep in the background; replies go on meanwhile."""
        if kind not in ("nap", "deep"):
            raise InvalidFactError(f"sleep kind must be 'nap' or 'deep', not {kind!r}")
        with self._state:
            if self._sleep_kind is not None:
                raise SleepRunningError(f"a {self._sleep_kind} is already running")
            self._sleep_kind, self._sleep_started = kind, time.time()
        self._lock.acquire()  # waits for the reply or injection in progress
        try:
            with self.lm.lock:
                snapshot = self.memory.snapshot()
        except BaseException:
            self._lock.release()
            with self._state:
                self._sleep_kind = None
            raise
        with self._state:
            self._serving = snapshot
        self._sleep = threading.Thread(target=self._run_sleep, args=(kind,), name=f"sleepwake-{kind}", daemon=True)
        self._sleep.start()

    def _run_sleep(self, kind: str) -> None:
        """The sleep thread: holds the lock from `start_sleep` until the new weights are live.

        With `auto_sleep`, the facts told during the sleep, once learned, may make the next
        sleep due (most often: one that MEMIT does not hold, as when a person's facts go
        back to MEMIT beside a new one); it runs at once, in this thread, up to
        `CHAINED_SLEEPS` times. Before, it waited for the next message that taught a fact."""
        try:
            for chained in range(CHAINED_SLEEPS + 1):
                with self.memory.apart():  # on a private copy: others answer from the loaded model
                    self.last_cycle = self.memory.sleep(deep=kind == "deep")
                self.last_error = None
                learned = self._learn_unlearned()
                due = self.memory.status(measure_perplexity=False)["pressure"]["due"] if learned else None
                if not (self.auto_sleep and due) or chained == CHAINED_SLEEPS:
                    break
                with self.lm.lock:  # replies during the next sleep read the weights now live
                    snapshot = self.memory.snapshot()
                with self._state:
                    self._serving, self._sleep_kind, kind = snapshot, due, due
        except Exception as exc:  # noqa: BLE001 - a thread's end: the cycle restored the last good state
            # and recorded the failure; `wait` and `status` report it
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._state:
                self._serving = None
                self._sleep_kind = self._sleep_started = None
            self._lock.release()

    def wait(self, timeout: float | None = None) -> CycleReport | None:
        """Block until the running sleep (if any) ends; returns its report."""
        thread = self._sleep
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"the sleep did not end within {timeout} s")
        if self.last_error:
            raise SleepwakeError(f"the sleep failed: {self.last_error}")
        return self.last_cycle

    def sleep(self, kind: str = "nap") -> CycleReport | None:
        """Sleep now and wait for the result."""
        self.start_sleep(kind)
        return self.wait()

    def _sleep_if_due(self) -> None:
        if self.sleeping() is None:
            due = self.memory.status(measure_perplexity=False)["pressure"]["due"]
            if due:
                try:
                    self.start_sleep(due)
                except SleepRunningError:
                    pass

    def close(self) -> None:
        """Wait for a running sleep, then close the store."""
        thread = self._sleep
        if thread is not None:
            thread.join()
        self.memory.close()


def _check_sampling(sampling: Any) -> None:
    if not isinstance(sampling, Sampling):
        raise InvalidRequestError(f"sampling must be a Sampling, got {type(sampling).__name__}")


class _Composed:
    """A reply put together from `pieces` (several answers, a masked generation, a
    sentence of our own), read like a `Decoding`: at most `n` tokens in all, as one
    generation keeps to the turn's `max_new_tokens`, and cut before the first of `stops`
    in the whole text (a stop string may span two pieces); `close` ends `pieces` (a
    masked generation then puts the weights back)."""

    def __init__(self, pieces: Iterator[str], tokenizer: Any, n: int, stops: Sequence[str] = ()) -> None:
        self.pieces, self.tokenizer, self.n, self.stops = pieces, tokenizer, n, tuple(stops)
        self.tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        text, shown = "", 0
        self.finish_reason = "stop"
        for piece in self.pieces:
            ids = self.tokenizer(text + piece, add_special_tokens=False)["input_ids"]
            full = len(ids) > self.n
            if full:
                piece = self.tokenizer.decode(ids[: self.n])[len(text):]
            text += piece
            cut = first_stop(text, self.stops)
            if cut is not None:
                text = text[:cut]
                self.tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                if cut > shown:
                    yield text[shown:]
                return
            self.tokens = min(len(ids), self.n)
            ready = len(text) - stop_prefix(text, self.stops)
            if ready > shown:
                yield text[shown:ready]
                shown = ready
            if full:
                self.finish_reason = "length"
                break
        if len(text) > shown:  # held back for a stop string that never came
            yield text[shown:]

    def close(self) -> None:
        close = getattr(self.pieces, "close", None)
        if close is not None:
            close()


def _fold_system(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    if msgs and msgs[0]["role"] == "system" and len(msgs) > 1:
        first = msgs[1]
        return [{"role": first["role"], "content": msgs[0]["content"] + "\n\n" + first["content"]}, *msgs[2:]]
    return msgs
