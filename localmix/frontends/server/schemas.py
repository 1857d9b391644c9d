"""The request bodies of the OpenAI (and Mistral) API as pydantic models: they give the OpenAPI
schema and the 400s. Parameters that OpenAI has are either supported, harmless to accept
(`ACCEPTED`: nothing about the reply depends on them) or refused with a 400 that names them
(`UNSUPPORTED`); a parameter OpenAI does not have is a 400 too. Nothing is silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# Accepted and without effect on the reply: bookkeeping that OpenAI stores or bills by.
ACCEPTED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                      "safety_identifier"})
# OpenAI parameters localmix does not implement: a 400 naming the parameter.
UNSUPPORTED = frozenset({"audio", "modalities", "prediction", "web_search_options", "functions", "function_call",
                         "reasoning_effort", "verbosity", "echo", "best_of", "suffix",
                         # Mistral's
                         "min_tokens", "prompt_mode", "prompt_logprobs", "top_prompt_logprobs"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None  # accepted: localmix adds no obfuscation padding


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    prefix: Optional[bool] = None  # Mistral: the assistant message is a prefix to continue; False only

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class Function(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: Function


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "schema"
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchema] = None


Stop = Union[str, list[str], None]


class Common(_Strict):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    stop: Stop = None
    seed: Optional[int] = Field(None, ge=0, lt=2**32)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    n: int = Field(1, ge=1, le=128)  # choices of one prompt; at most --parallel (a 400 names n)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # Mistral's names
    random_seed: Optional[int] = Field(None, ge=0, lt=2**32)
    safe_prompt: bool = False
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)  # llama.cpp divides by it
    # llama.cpp's server's names (llama-server clients send them)
    repeat_penalty: Optional[float] = Field(None, gt=0.0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["auto", "none", "required", "any"], NamedToolChoice, None] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class CompletionRequest(Common):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # the legacy shape: how many alternatives


class FIMRequest(Common):
    """Mistral's fill-in-the-middle (`client.fim.complete`): the code before and after the gap."""
    prompt: str
    suffix: Optional[str] = None
