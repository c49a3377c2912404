"""The `sleepwake` argument parser: global options (accepted before or after the
command), each command's options, and argparse types whose errors name the problem."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sleepwake import __version__
from sleepwake.cli.commands import (
    cmd_ask,
    cmd_chat,
    cmd_complete,
    cmd_eval,
    cmd_export,
    cmd_facts,
    cmd_forget,
    cmd_history,
    cmd_inject,
    cmd_nap,
    cmd_rollback,
    cmd_serve,
    cmd_sleep,
    cmd_status,
)
from sleepwake.cli.context import PROG, Context, UsageError
from sleepwake.cli.output import short
from sleepwake.store import ID_MAX

MAX_NEW_TOKENS = 2048


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = f" (see '{self.prog} --help')"
        raise UsageError(message + hint)


def _int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (no upper bound if None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if high is None and value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


_positive_int = _int_between(1, MAX_NEW_TOKENS)
_count = _int_between(0)


def _whole_number(what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a {what} id is a whole number, got {short(text, 40)!r}") from None
        if not 1 <= value <= ID_MAX:
            raise argparse.ArgumentTypeError(f"a {what} id is a whole number from 1 to {ID_MAX}, "
                                             f"got {short(text, 40)}")
        return value

    return parse


_fact_id = _whole_number("fact")


def _user_name(text: str) -> str:
    from sleepwake.errors import InvalidUserError
    from sleepwake.users import check_user

    try:
        return check_user(text)
    except InvalidUserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--home", metavar="DIR", default=default,
                        help="memory home (default: $SLEEPWAKE_HOME or ~/.sleepwake)")
    parser.add_argument("--user", metavar="NAME", type=_user_name, default=default,
                        help="whose memory in the home (default: 'default', the home's own; another user's lives "
                             "in HOME/users/NAME): 1-64 letters, digits, '_', '.', '-'")
    parser.add_argument("--model", metavar="M", default=default,
                        help="base model: a .gguf file, a local Hugging Face directory, or a hub id in the "
                             "local cache (default: SmolLM2-135M-Instruct)")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="no progress bars or status lines; minimal output")
    parser.add_argument("--raw-only", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="edit facts written now for raw completions only, not chat questions: about "
                             "twice the capacity (BENCHMARKS.md); chat questions see them after a nap")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=default,
                        help="where the model runs: auto (the default: a CUDA GPU if PyTorch sees one, else "
                             "the CPU), cpu or cuda")
    parser.add_argument("--device-map", metavar="MAP", default=default,
                        help="place the model over all visible GPUs with accelerate: auto (or balanced, "
                             "balanced_low_0, sequential, or a JSON object {module name: device}); each layer's "
                             "memory lives on its GPU. Instead of --device")
    parser.add_argument("--quantize", choices=["nf4"], default=default,
                        help="load the base model's linear layers in 4-bit NF4 (bitsandbytes; SmolLM2-135M's "
                             "tensors take a third of float32's); what it learns stays float32 beside them. "
                             "A home belongs to the model in the form it was made with")
    parser.add_argument("--backend", choices=["torch", "mlx"], default=default,
                        help="array library the model runs on: torch (the default) or mlx (Apple's MLX: Metal on "
                             "Apple silicon, the CPU through mlx-cpu on Linux; needs mlx and mlx-lm). A home "
                             "works with either; MLX runs every command and both sleeps")
    parser.add_argument("--consolidation", choices=["keyed", "lora"], default=default,
                        help="where sleep moves facts: keyed (the default: one entry per subject, read where "
                             "its key is) or lora (the paper's: a LoRA adapter trained with replay, on either "
                             "backend)")
    parser.add_argument("--chat-edit-limit", type=_count, metavar="N", default=default,
                        help="edit facts for chat questions too only while MEMIT holds at most N facts "
                             "(default 40); past it, every fact MEMIT holds is edited for raw prompts only")


def _assistant_options(p: argparse.ArgumentParser) -> None:
    """Options of the `Assistant` behind `chat` and `serve`."""
    p.add_argument("--extractor", choices=["rules", "model"], default="rules",
                   help="how facts are found in messages: rules (default), or the loaded model asked for "
                        "JSON triples (for capable models)")
    p.add_argument("--unknown", choices=["mask", "decline"], default="mask",
                   help="a question about a known person that nothing stored answers: answered by the "
                        "model without that person's edits (mask, the default), or declined with a short "
                        "'I don't know' (decline)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="A language model with a memory in its weights: facts are written in by MEMIT edits.",
        epilog="Run 'sleepwake COMMAND --help' for a command's options.",
    )
    _global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    # The global options are also accepted after the command ("sleepwake facts --home X").
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, handler: Callable[[Context], int], help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help, parents=[common])
        p.set_defaults(handler=handler)
        return p

    p = add("inject", cmd_inject, "write facts into the model's weights now",
            'Write facts into the weights (MEMIT). A fact with the subject and relation of a stored '
            'fact replaces it; a fact already known is skipped. Example: '
            'sleepwake inject "Anselm Kreutzer | lives in | Lisbon"')
    p.add_argument("facts", nargs="*", metavar="FACT", help='a fact written "SUBJECT | RELATION | OBJECT"')
    p.add_argument("--facts", dest="facts_file", metavar="FILE.jsonl",
                   help='facts file: one JSON object per line with "subject", "relation", "object" '
                        'and optionally "question"')
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = add("facts", cmd_facts, "list the facts in memory")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--all", action="store_true", help="include forgotten and replaced facts")

    p = add("forget", cmd_forget, "remove a fact from the weights (see 'sleepwake facts' for ids)")
    p.add_argument("id", type=_fact_id, metavar="ID", help="fact id")
    p.add_argument("--json", action="store_true", help="print the forgotten fact as JSON")

    p = add("complete", cmd_complete, "greedy raw continuation of a prompt")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N", default=None,
                   help="tokens to generate (default: 24)")
    p.add_argument("--json", action="store_true", help="print prompt and completion as JSON")

    p = add("ask", cmd_ask, "answer a question through the model's chat template")
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N", default=None,
                   help="tokens to generate (default: 24)")
    p.add_argument("--json", action="store_true", help="print question and answer as JSON")

    p = add("eval", cmd_eval, "measure recall of a facts file (injected or not) and perplexity")
    p.add_argument("--facts", dest="facts_file", metavar="FILE.jsonl", required=True,
                   help="facts file, as for 'inject --facts'")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = add("nap", cmd_nap, "move the facts held by MEMIT edits into a LoRA adapter (exit 3 if rejected)")
    p.add_argument("--json", action="store_true", help="print the cycle report as JSON")
    p = add("sleep", cmd_sleep, "deep sleep: consolidate all memory into one adapter, with replay (exit 3 if rejected)")
    p.add_argument("--deep", action="store_true", help="deep sleep (the default)")
    p.add_argument("--light", action="store_true", help="a nap instead")
    p.add_argument("--json", action="store_true", help="print the cycle report as JSON")
    p = add("status", cmd_status, "sleep pressure and its parts; facts by where they live")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p = add("rollback", cmd_rollback, "return to the state before a sleep cycle (see 'sleepwake history')")
    p.add_argument("cycle", type=_whole_number("cycle"), metavar="CYCLE", help="cycle id")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = add("export", cmd_export, "write all learned memory as one PEFT LoRA adapter")
    p.add_argument("--adapter", metavar="DIR", required=True, help="directory to write (new, or an earlier export)")
    p.add_argument("--max-rank", type=_int_between(1), metavar="N",
                   help="cut each module's delta to rank N at most (truncated SVD, the largest singular values "
                        "kept): a smaller adapter that answers approximately")
    p = add("chat", cmd_chat, "chat with the model; it learns the facts you tell it (/help inside)",
            "An interactive chat. Facts stated in your messages are written into the weights at once; "
            "naps and deep sleeps run in the background when the sleep pressure calls for them (or on "
            "/nap, /sleep). Reads messages from standard input, so it can also be driven by a script.")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N", default=96,
                   help="longest reply in tokens (default: 96)")
    p.add_argument("--no-auto-sleep", action="store_true", help="sleep only on /nap or /sleep")
    _assistant_options(p)
    p = add("serve", cmd_serve, "serve the chat (OpenAI-compatible), the memory API and a web page over HTTP",
            "An HTTP server: a web page at /, OpenAI's chat completions at /v1/chat/completions (it learns "
            "from the user's messages, as 'chat' does) and legacy completions at /v1/completions, the memory "
            "at /v1/memory/..., a health check at /health, the API's description at /openapi.json. It listens "
            "on 127.0.0.1 unless told otherwise; any other address needs a token, which every request but "
            "the page and /health must then send as 'Authorization: Bearer TOKEN'.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--token", metavar="T", help="require this bearer token (default: $SLEEPWAKE_TOKEN)")
    p.add_argument("--keys", metavar="FILE",
                   help='API keys per user: a JSON object {"KEY": "USER", ...} or lines "KEY USER"; a request '
                        "with a key reaches only its user's memory (instead of --token)")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N", default=256,
                   help="longest reply in tokens; a request may ask for fewer (default: 256)")
    p.add_argument("--no-auto-sleep", action="store_true",
                   help="sleep only when asked to (POST /v1/memory/nap or /v1/memory/sleep)")
    p.add_argument("--sleep-epochs", type=_positive_int, metavar="N",
                   help="training epochs of each nap and deep sleep (default: the configuration's); "
                        "fewer is faster and may consolidate less")
    _assistant_options(p)
    p = add("history", cmd_history, "every nap and sleep with its measured results")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return parser
