"""Request and response bodies, as pydantic models: they validate what comes in and
make the OpenAPI document at /openapi.json exact."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sleepwake.decoding import MAX_STOP_CHARS, MAX_STOPS, SEED_RANGE, Sampling
from sleepwake.facts import MAX_FIELD_CHARS
from sleepwake.store import ID_MAX  # ids are SQLite integers: a larger one is refused (422), not looked up


def _encodable(text: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800") that no tokenizer or database can store."""
    text.encode("utf-8")  # UnicodeEncodeError is a ValueError: pydantic reports it as invalid input
    return text


Text = Annotated[str, AfterValidator(_encodable)]
FieldText = Annotated[Text, Field(min_length=1, max_length=MAX_FIELD_CHARS)]
Id = Annotated[int, Field(ge=1, le=ID_MAX)]


# --- chat completions (OpenAI's API) ----------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def plain(self) -> dict[str, str]:
        """The message as `Assistant.turn` takes it ("developer" is OpenAI's newer "system")."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


Penalty = Annotated[float | None, Field(description="not supported: only 0 is accepted")]
StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class Generation(BaseModel):
    """What OpenAI's chat and legacy completion requests share. A field OpenAI has
    that is not implemented is declared, and accepted only at a value that changes
    nothing (`unsupported` names any other); a field OpenAI does not have is refused (422)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="ignored: the server has one model")
    max_tokens: int | None = Field(None, ge=1, description="at most the server's --max-new-tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 (the default) is greedy decoding")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = Field(
        None, description="the text ends before the first of these")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1],
                             description="makes sampling reproducible (on the same server)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[Text, Field(max_length=256)] | None = Field(
        None, description="whose memory answers (and learns): a user name, default 'default'; with API keys "
                          "(--keys), the key's user, and no other")
    n: int | None = Field(None, description="not supported: only 1 is accepted")
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only {} is accepted")

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature or 0.0, top_p=1.0 if self.top_p is None else self.top_p,
                        stop=self.stop or (), seed=self.seed)

    def unsupported(self) -> str | None:
        """The first field set to a value that would change the result, which is not
        implemented (so it is refused rather than silently ignored)."""
        return next((name for name, allowed in self._only().items()
                     if getattr(self, name) not in (None, *allowed)), None)

    def _only(self) -> dict[str, tuple]:
        """The values of the unsupported fields that change nothing (besides null)."""
        return {"n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},)}


class ChatRequest(Generation):
    """OpenAI's chat-completion request."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    conversation: Id | None = Field(None, description="sleepwake: continue this stored conversation "
                                                      "(or send the header X-Sleepwake-Conversation)")
    logprobs: bool | None = Field(None, description="not supported: only false is accepted")
    top_logprobs: int | None = Field(None, description="not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: only [] is accepted")
    tool_choice: str | dict[str, Any] | None = Field(None, description='not supported: only "none" is accepted')
    parallel_tool_calls: bool | None = Field(None, description="not supported (there are no tools)")
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: only [] is accepted")
    function_call: str | dict[str, Any] | None = Field(None, description='not supported: only "none" is accepted')
    response_format: dict[str, Any] | None = Field(None, description='not supported: only {"type": "text"}')

    def _only(self) -> dict[str, tuple]:
        return {**super()._only(), "logprobs": (False,), "top_logprobs": (), "tools": ([],),
                "tool_choice": ("none",), "parallel_tool_calls": (), "functions": ([],),
                "function_call": ("none",), "response_format": ({"type": "text"},)}


class CompletionRequest(Generation):
    """OpenAI's legacy completion request: a raw continuation of `prompt`."""

    prompt: Text = Field(description="the text to continue (one string)")
    max_tokens: int | None = Field(None, ge=1, description="default 16, at most the server's --max-new-tokens")
    logprobs: int | None = Field(None, description="not supported")
    echo: bool | None = Field(None, description="not supported: only false is accepted")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, description="not supported: only 1 is accepted")

    def _only(self) -> dict[str, tuple]:
        return {**super()._only(), "logprobs": (), "echo": (False,), "suffix": (), "best_of": (1,)}


# --- memory -------------------------------------------------------------------------


class FactIn(BaseModel):
    subject: FieldText
    relation: FieldText
    object: FieldText
    question: Annotated[Text, Field(max_length=MAX_FIELD_CHARS)] | None = Field(
        None, description="the chat question whose answer is the object (default: made from the relation)")


FactsIn = Annotated[list[FactIn], Field(min_length=1, max_length=100)]


class FactOut(BaseModel):
    id: int
    subject: str
    relation: str
    object: str
    question: str | None = None
    status: Literal["active", "replaced", "forgotten"]
    where: Literal["memit", "consolidated"] = Field(
        description="memit: held by a MEMIT edit; consolidated: a sleep's LoRA adapter holds it")
    created_at: float
    ended_at: float | None = None
    replaced_by: int | None = None


class Injected(BaseModel):
    injected: list[FactOut]
    skipped: list[FactIn] = Field(description="already known, unchanged")


class NapRequest(BaseModel):
    """A nap takes no options: an empty body or {}."""

    model_config = ConfigDict(extra="forbid")


class SleepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deep: bool = Field(True, description="deep sleep (the default), or a nap")


class SleepStarted(BaseModel):
    started: Literal["nap", "deep"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class ErrorBody(BaseModel):
    """Every error, as in OpenAI's API."""

    error: ErrorDetail
