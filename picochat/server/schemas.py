"""OpenAI request bodies: parsing, validation and conversion into a prompt and SamplingParams.

Every client mistake becomes an :class:`ApiError` (status 400 unless said otherwise) with a
one-line message naming the offending parameter; nothing here touches the engine. vLLM's extra
sampling parameters (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids``, ``return_token_ids``) are accepted as vLLM accepts them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from picochat.config import SamplingParams
from picochat.engine.protocol import ChatMessage, Prompt
from picochat.errors import ConfigError

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the legacy completions API's default


class ApiError(Exception):
    """A request the server refuses; rendered as an OpenAI error body."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type = message, status, param, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")
    PROMPT_PARAM: ClassVar[str] = "prompt"  # the parameter a too-long prompt is blamed on

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    top_k: int | None = None
    min_p: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    n: int = 1

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, prompt_tokens: int, max_model_len: int, default_max_tokens: int | None) -> SamplingParams:
        """Validate against the context: ``default_max_tokens`` None → the rest of the context."""
        if self.n != 1:
            raise ApiError(f"only n=1 is supported, got {self.n}", param="n")
        if prompt_tokens >= max_model_len:
            raise ApiError(f"This model's maximum context length is {max_model_len} tokens; the prompt "
                           f"takes {prompt_tokens}", param=self.PROMPT_PARAM)
        room = max_model_len - prompt_tokens
        requested = self.requested_max_tokens()
        if requested is not None and requested < 1:
            raise ApiError(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
        if requested is not None and requested > room:
            raise ApiError(f"This model's maximum context length is {max_model_len} tokens; you requested "
                           f"{prompt_tokens + requested} ({prompt_tokens} in the prompt, {requested} "
                           f"for the completion)", param="max_tokens")
        if requested is None:
            requested = room if default_max_tokens is None else min(default_max_tokens, room)
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        given = {
            "temperature": self.temperature if self.temperature is not None else 1.0,
            "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "seed": self.seed,
        }
        try:
            return SamplingParams(
                **{k: v for k, v in given.items() if v is not None}, max_tokens=requested,
                stop=tuple(s for s in stop if s), stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos).validate()
        except ConfigError as e:  # SamplingParams' messages start with the field's name
            raise ApiError(str(e), param=str(e).split(" ", 1)[0]) from None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def to_chat(self) -> ChatMessage:
        if self.content is None or isinstance(self.content, str):
            text = self.content or ""
        else:
            try:
                text = "".join(TextPart.model_validate(part).text for part in self.content)
            except ValidationError:
                raise ApiError("only text content parts are supported", param="messages") from None
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    PROMPT_PARAM: ClassVar[str] = "messages"
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompt(self) -> list[ChatMessage]:
        if self.logprobs:
            raise ApiError("logprobs are not supported", param="logprobs")
        return [m.to_chat() for m in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[TokenId], list[str], list[list[TokenId]]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None

    def to_prompt(self) -> Prompt:
        if self.echo:
            raise ApiError("echo is not supported", param="echo")
        if self.logprobs:
            raise ApiError("logprobs are not supported", param="logprobs")
        if self.best_of not in (None, 1):
            raise ApiError(f"only best_of=1 is supported, got {self.best_of}", param="best_of")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError("one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError("the prompt is empty", param="prompt")
        return prompt


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a raw prompt or chat messages."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = None
    messages: list[Message] | None = None

    def to_prompt(self) -> Prompt:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError("give either prompt or messages", param="prompt")
        return self.prompt if self.prompt is not None else [m.to_chat() for m in self.messages]


def _is_union_member(loc_part: object) -> bool:
    """pydantic names the union member it tried in an error's location ("str", "list[int]")."""
    return isinstance(loc_part, str) and (loc_part in ("str", "int") or "[" in loc_part)


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes → a validated request model, or ApiError(400) with a one-line reason."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\\ud800"
        raise ApiError("the request body contains a string that is not valid Unicode") from None
    try:
        return model.model_validate(body)
    except ValidationError as e:
        # the deepest error is the most specific one: for a union, the member that came closest
        worst = max(e.errors(), key=lambda err: len(err["loc"]))
        param = ".".join(str(p) for p in worst["loc"] if not _is_union_member(p)) or None
        raise ApiError(f"{param}: {worst['msg']}" if param else worst["msg"], param=param) from None
