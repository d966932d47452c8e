"""Hypothesis strategies for OpenAI request bodies (every known parameter with plausible and
implausible values, unknown keys, any JSON where a structure is expected), and the check."""

import httpx
from hypothesis import strategies as st
from server_live import MODEL

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=8)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "", "x"])
messages = st.lists(st.fixed_dictionaries({"role": roles}, optional={
    "content": st.text(max_size=30) | json_values, "name": st.text(max_size=5)}), max_size=3)
numbers = st.integers(-3, 5000) | st.floats(-3, 3) | st.sampled_from([0, -1, 2**63, 10**30, 1e308])
known = {
    "model": st.sampled_from([MODEL, "other"]) | json_values,
    "messages": messages | json_values,
    "prompt": st.text(max_size=30) | st.lists(st.integers(-2, 60000), max_size=5) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    **{name: numbers | json_values for name in (
        "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
        "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "n", "best_of", "logprobs")},
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | json_values,
    "stop_token_ids": st.lists(st.integers(-2, 60000), max_size=3) | json_values,
    "ignore_eos": st.booleans() | json_values,
    "return_token_ids": st.booleans() | json_values,
    "echo": st.booleans() | json_values,
}
bodies = st.fixed_dictionaries({}, optional=known).flatmap(
    lambda body: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(lambda extra: {**extra, **body}))
paths = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize"])


def post_expecting_no_500(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    response = http.post(path, content=content, headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code < 500, (content, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["code"] == response.status_code and error["message"]
    return response
