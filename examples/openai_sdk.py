"""An OpenAI-SDK request to a running `drllm serve` (pip install openai).

drllm's own fields (routing, depth_bias, max_passes) travel in `extra_body`; the routing
information of the answer is in the response's `drllm` field. JSON mode and JSON schemas use
the SDK's own `response_format`; a conversation's next turn reuses the cached KV of the earlier
ones (`usage.prompt_tokens_details.cached_tokens`). Log-probabilities come as in OpenAI's API,
and a completion with `echo` and `max_tokens=0` scores a text without generating. Tool calls
need a chat template that can make them: for SmolLM2 (whose own template has none) start the
server with `--chat-template-file templates/chatml-tools.jinja`; otherwise that part is skipped.

    python3 examples/openai_sdk.py [BASE_URL]     (default http://127.0.0.1:8088/v1)
"""

import json
import os
import sys

import openai
from openai import OpenAI

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8088/v1"
client = OpenAI(base_url=base, api_key=os.environ.get("DRLLM_API_KEY", "none"))
model = client.models.list().data[0].id

resp = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Give me one fun fact about octopuses."}],
    max_tokens=60,
    temperature=0,
    extra_body={"depth_bias": 0.0},
)
print(resp.choices[0].message.content)
info = resp.model_extra.get("drllm", {})
print(f"path {info.get('path')}: {info.get('passes')} of {info.get('n_layer')} block passes, "
      f"skipped {info.get('skipped')}, repeated {info.get('repeated')}")

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count to five."}],
    max_tokens=30,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

# each token's log-probability and its two likeliest alternatives
resp = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=5,
    temperature=0,
    logprobs=True,
    top_logprobs=2,
)
for e in resp.choices[0].logprobs.content:
    alts = ", ".join(f"{a.token!r} {a.logprob:.2f}" for a in e.top_logprobs)
    print(f"{e.token!r}: {e.logprob:.2f}  ({alts})")


# scoring continuations by their log-probabilities (lm-evaluation-harness style)
def score(context, continuation):
    r = client.completions.create(model=model, prompt=context + continuation, echo=True,
                                  logprobs=0, max_tokens=0)
    lp = r.choices[0].logprobs
    return sum(x for x, o in zip(lp.token_logprobs, lp.text_offset)
               if o >= len(context) and x is not None)


for city in [" Paris", " London"]:
    print(f"The capital of France is{city}: {score('The capital of France is', city):.2f}")

# embeddings (unit vectors, pooled as `drllm serve --pooling` says) and their cosine similarity
texts = ["A cat sat on the mat.", "A kitten slept on the rug.", "Stock markets fell today."]
vecs = [d.embedding for d in client.embeddings.create(model=model, input=texts).data]
for t, v in zip(texts[1:], vecs[1:]):
    print(f"cos({texts[0]!r}, {t!r}) = {sum(a * b for a, b in zip(vecs[0], v)):.3f}")

# JSON mode with a schema: the answer is JSON that follows it
schema = {
    "type": "object",
    "properties": {"animal": {"type": "string"}, "legs": {"type": "integer"}},
    "required": ["animal", "legs"],
    "additionalProperties": False,
}
resp = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name an animal and how many legs it has, as JSON."}],
    max_tokens=60,
    temperature=0,
    response_format={"type": "json_schema", "json_schema": {"name": "animal", "schema": schema}},
)
answer = json.loads(resp.choices[0].message.content)
print(f"JSON: {answer}")

# the next turn of that conversation: its history comes from the cache
resp2 = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "user", "content": "Name an animal and how many legs it has, as JSON."},
        {"role": "assistant", "content": resp.choices[0].message.content},
        {"role": "user", "content": "And one with more legs?"},
    ],
    max_tokens=60,
    temperature=0,
    response_format={"type": "json_object"},
)
cached = resp2.usage.prompt_tokens_details.cached_tokens if resp2.usage.prompt_tokens_details else 0
print(f"JSON: {json.loads(resp2.choices[0].message.content)} "
      f"({cached} of {resp2.usage.prompt_tokens} prompt tokens from the cache)")

# tool calls: the model asks for get_weather; we run it and give the result back
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
question = [{"role": "user", "content": "What is the weather in Paris?"}]
try:
    resp = client.chat.completions.create(model=model, messages=question, tools=tools,
                                          tool_choice="required", max_tokens=60, temperature=0)
except openai.BadRequestError as e:
    print(f"tools: {e.body.get('message') if isinstance(e.body, dict) else e}")
else:
    call = resp.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    print(f"tool call: {call.function.name}({args})")
    result = {"city": args.get("city"), "temperature_c": 18, "sky": "sunny"}
    resp = client.chat.completions.create(
        model=model, tools=tools, max_tokens=40, temperature=0,
        messages=question + [resp.choices[0].message,
                             {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}],
    )
    print(f"answer: {resp.choices[0].message.content}")
