"""Request and response bodies (pydantic), following vLLM's pooling/score API and OpenAI's completions.

Unknown fields are refused (``extra="forbid"``): a misspelt option must not be silently ignored. Types
are strict (a string is never coerced to a number). Completions accept the OpenAI fields a client
library sends by default, ``echo`` with prompt logprobs (lm-evaluation-harness's loglikelihood), and
refuse the ones that would need decoding (``stream``, ``n`` > 1, ``max_tokens`` > 1). Score takes
vLLM's four pairings of its two sides; rerank is one body for the Jina (``/v1/rerank``) and Cohere
(``/v2/rerank``) clients, as vLLM serves them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

TokenId = Annotated[StrictInt, Field(ge=0)]
Number = Union[StrictInt, StrictFloat]
# One input: text, or token ids. Several inputs: a list of either.
Inputs = Union[StrictStr, list[StrictStr], list[TokenId], list[list[TokenId]]]
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=20)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="keep only the last k tokens of each input instead of refusing inputs over the limit"
    )


class ClassifyRequest(_Request):
    input: Inputs


Texts = Union[StrictStr, list[StrictStr]]
# vLLM's pairings of a score request's two sides, as (first, second) field names.
SCORE_PAIRS = (("queries", "documents"), ("queries", "items"), ("text_1", "text_2"), ("data_1", "data_2"))


class ScoreRequest(_Request):
    """One query (1:N against the second side) or one per entry (1:1); the two sides under any of vLLM's
    names (``SCORE_PAIRS``), exactly one pairing per request."""

    queries: Texts | None = Field(None, description="the first side: one text (1:N) or one per entry of the second (1:1)")
    documents: Texts | None = None
    items: Texts | None = None
    text_1: Texts | None = None
    text_2: Texts | None = None
    data_1: Texts | None = None
    data_2: Texts | None = None
    label_token_ids: list[TokenId] | None = Field(None, description="default: the server's --labels tokens")
    apply_softmax: StrictBool = Field(True, description="softmax over the label tokens only; false: full-vocabulary probabilities")
    item_first: StrictBool = False


class RerankRequest(_Request):
    """Jina's and Cohere's rerank body (vLLM's ``RerankRequest``)."""

    query: StrictStr
    documents: list[StrictStr]
    top_n: Annotated[StrictInt, Field(ge=0)] | None = Field(None, description="the n best documents; 0 or none: all")
    return_documents: StrictBool = True
    max_tokens_per_doc: Annotated[StrictInt, Field(ge=1)] | None = Field(None, description="Cohere's: keep each document's first k tokens")
    label_token_ids: list[TokenId] | None = None


class TokenizeRequest(_Request):
    """vLLM's ``/tokenize``: a prompt, or chat messages rendered with the tokenizer's chat template."""

    prompt: StrictStr | None = None
    messages: list[dict] | None = None
    add_special_tokens: StrictBool | None = Field(None, description="default: true for a prompt, false for messages")
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class CompletionRequest(_Request):
    prompt: Inputs
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = Field(1, description="prefill only: 0 or 1")
    logprobs: TopLogprobs | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: StrictInt | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: StrictBool = False
    echo: StrictBool = False
    stop: Union[StrictStr, list[StrictStr], None] = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    user: StrictStr | None = None
    suffix: StrictStr | None = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Response(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(_Response):
    id: str = Field(default_factory=lambda: _id("classify"))
    object: Literal["list"] = "list"
    data: list[ClassifyData]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float = Field(description="probability of the first label token")
    probs: list[float] = Field(description="one per label token")


class ScoreResponse(_Response):
    id: str = Field(default_factory=lambda: _id("score"))
    object: Literal["list"] = "list"
    data: list[ScoreData]


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(_Response):
    id: str = Field(default_factory=lambda: _id("rerank"))
    results: list[RerankResult]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token its text, log-probability and most likely alternatives (with
    ``echo``, the prompt's tokens first, whose first entry has none: nothing comes before it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["length"] = "length"


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "zp-compile"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
