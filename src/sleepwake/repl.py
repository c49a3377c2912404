"""`sleepwake chat`: an interactive chat that learns from what you tell it.

Each message is read from the input, the facts it states are written into the
weights at once (a quiet line shows them), and the reply streams token by token.
Naps and deep sleeps run in the background — the chat goes on, answered from the
weights as they were before the sleep — and their results are shown when they end.
Driven by a script (input not a terminal), it prints no prompts.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import TextIO

from sleepwake.errors import SleepwakeError
from sleepwake.talk import Assistant

HELP = """commands:
  /facts          what the memory holds, and where each fact lives
  /forget ID      remove a fact
  /nap            move the facts held by MEMIT edits into LoRA (in the background)
  /sleep          deep sleep: consolidate everything (in the background)
  /status         sleep pressure, facts by where they live, a running sleep
  /help           this list
  /quit           leave (waits for a running sleep to finish)
anything else is a message to the assistant."""


class ChatLoop:
    """The read–learn–reply loop, separate from argument parsing so it can be driven by tests."""

    def __init__(self, bot: Assistant, inp: TextIO, out: TextIO, *, interactive: bool, quiet: bool = False) -> None:
        self.bot = bot
        self.inp = inp
        self.out = out
        self.interactive = interactive
        self.quiet = quiet
        self.history: list[dict[str, str]] = []
        self.conversation: int | None = None
        self._reported = bot.last_cycle  # the last sleep result already shown

    def note(self, text: str) -> None:
        """A quiet line: dim on a terminal."""
        if self.quiet:
            return
        line = f"  · {text}"
        print(f"\033[2m{line}\033[0m" if self.interactive else line, file=self.out, flush=True)

    def run(self) -> int:
        if self.interactive and not self.quiet:
            print("sleepwake chat — tell me things; /help for commands, /quit to leave", file=self.out)
        while True:
            self._report_sleep()
            if self.interactive:
                print("you> ", end="", file=self.out, flush=True)
            line = self.inp.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            try:
                if text.startswith("/"):
                    if not self.command(text):
                        break
                else:
                    self.message(text)
            except SleepwakeError as exc:
                print(f"  ! {exc}", file=self.out, flush=True)
        if self.bot.sleeping():
            self.note(f"waiting for the {self.bot.sleeping()} to finish …")
        try:
            self.bot.wait()
        except SleepwakeError:
            pass  # a failed sleep: shown just below
        self._report_sleep()
        return 0

    def message(self, text: str) -> None:
        turn = self.bot.turn([*self.history, {"role": "user", "content": text}], conversation=self.conversation)
        self.conversation = turn.conversation
        for r in turn.learned:
            self.note(f"learned #{r.id}: {r.fact.subject} | {r.fact.relation} | {r.fact.object}")
        for f in turn.pending:
            self.note(f"will learn after the sleep: {f.subject} | {f.relation} | {f.object}")
        if self.interactive:
            print("bot> ", end="", file=self.out, flush=True)
        for piece in turn.stream():
            print(piece, end="", file=self.out, flush=True)
        print(file=self.out, flush=True)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": turn.reply}]

    def command(self, text: str) -> bool:
        """Run a /command; False to leave."""
        try:
            name, *args = shlex.split(text)
        except ValueError:
            name, args = text.split()[0], []
        handlers: dict[str, Callable[[list[str]], bool | None]] = {
            "/facts": self._facts, "/forget": self._forget, "/nap": lambda a: self._sleep("nap"),
            "/sleep": lambda a: self._sleep("deep"), "/status": self._status,
            "/help": lambda a: print(HELP, file=self.out), "/quit": lambda a: False, "/exit": lambda a: False,
        }
        handler = handlers.get(name.lower())
        if handler is None:
            print(f"  ! unknown command {name}; /help lists them", file=self.out)
            return True
        return handler(args) is not False

    def _facts(self, _args: list[str]) -> None:
        facts = self.bot.facts()
        if not facts:
            print("  (no facts yet)", file=self.out)
        for r in facts:
            print(f"  #{r.id:<4} {r.where:<12} {r.fact.subject} | {r.fact.relation} | {r.fact.object}", file=self.out)

    def _forget(self, args: list[str]) -> None:
        if len(args) != 1 or not args[0].lstrip("#").isdigit():
            print("  ! usage: /forget ID (see /facts)", file=self.out)
            return
        r = self.bot.forget(int(args[0].lstrip("#")))
        self.note(f"forgot #{r.id}: {r.fact.subject} | {r.fact.relation} | {r.fact.object}"
                  + (" (it leaves the consolidated memory at the next sleep)" if r.where == "consolidated" else ""))

    def _sleep(self, kind: str) -> None:
        self.bot.start_sleep(kind)
        self.note(f"{'napping' if kind == 'nap' else 'deep sleep'} in the background; the chat goes on")

    def _status(self, _args: list[str]) -> None:
        st = self.bot.status()
        p = st["pressure"]
        running = st["sleeping"]
        print(f"  facts: {st['facts']['memit']} in MEMIT edits, {st['facts']['consolidated']} consolidated", file=self.out)
        print(f"  sleep pressure {p['total']:.2f} (edits {p['edits']:.2f}, time {p['time']:.2f}); "
              f"due: {p['due'] or 'nothing'}" + (f"; a {running['kind']} is running" if running else ""),
              file=self.out)

    def _report_sleep(self) -> None:
        rep = self.bot.last_cycle
        if rep is not None and rep is not self._reported:
            self._reported = rep
            what = "nap" if rep.kind == "nap" else "deep sleep"
            if rep.status == "accepted":
                self.note(f"{what} done: {len(rep.consolidated)} fact(s) consolidated, {len(rep.kept)} kept in MEMIT "
                          f"({rep.seconds:.0f} s)")
            else:
                self.note(f"{what} {rep.status}" + (f": {rep.reason}" if rep.reason else ""))
        if self.bot.last_error and self.bot.sleeping() is None:
            print(f"  ! the sleep failed: {self.bot.last_error}", file=self.out)
            self.bot.last_error = None
