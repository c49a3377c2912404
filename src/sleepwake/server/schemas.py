"""Request and response bodies, as pydantic models: they validate what comes in and
make the OpenAPI document at /openapi.json exact."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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


class ChatRequest(BaseModel):
    """OpenAI's chat-completion request; fields it has and we do not use (temperature,
    top_p, ...) are accepted and ignored: decoding is greedy."""

    model: str | None = Field(None, description="ignored: the server has one model")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="at most the server's --max-new-tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    conversation: Id | None = Field(None, description="sleepwake: continue this stored conversation "
                                                      "(or send the header X-Sleepwake-Conversation)")


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
