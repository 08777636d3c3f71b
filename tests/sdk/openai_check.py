"""drllm's OpenAI surface driven by the real `openai` Python SDK (run by tests/sdk_tests.rs
against a `drllm serve` it starts; scripts/sdk-env.sh installs the pinned SDK).

    python3 tests/sdk/openai_check.py BASE_URL [--smollm2]

Every check raises on failure; the last line printed is a JSON summary. `--smollm2`: the
server runs SmolLM2-135M-Instruct, and the answers' content is checked too. The server runs
with `--chat-template-file templates/chatml-tools.jinja` (tool calls).
"""

import json
import math
import sys

import openai
from openai import OpenAI

base = sys.argv[1]
smollm2 = "--smollm2" in sys.argv[2:]
client = OpenAI(base_url=base, api_key="none", max_retries=0)
summary = {"sdk": openai.__version__}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# models: the served model, and any name a request gives is answered by it
models = client.models.list().data
check(len(models) >= 1, f"models.list: {models}")
model = models[0].id
summary["model"] = model
for name in [model, "gpt-4o-mini"]:
    r = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    check(r.model == model, f"a request naming {name} is answered by {r.model}")

# chat, whole and streamed: the same text at temperature 0
msgs = [{"role": "user", "content": "Name three colours."}]
whole = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
text = whole.choices[0].message.content
parts = []
for chunk in client.chat.completions.create(
    model=model, messages=msgs, max_tokens=12, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
check("".join(parts) == text, f"stream {''.join(parts)!r} vs whole {text!r}")

# logprobs on chat: every token with its value and its alternatives, streamed the same
r = client.chat.completions.create(
    model=model, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
)
content = r.choices[0].logprobs.content
check(len(content) == r.usage.completion_tokens, f"{len(content)} logprobs for {r.usage.completion_tokens} tokens")
for e in content:
    check(e.logprob <= 0 and len(e.top_logprobs) == 3, f"logprob entry {e}")
    check(e.top_logprobs[0].logprob >= e.logprob - 1e-6, "greedy: the chosen token is the most likely")
    check(bytes(e.bytes).decode("utf-8", "replace") == e.token or not e.bytes, f"bytes of {e}")
streamed = []
for chunk in client.chat.completions.create(
    model=model, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
    stream=True,
):
    if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
        streamed.extend(chunk.choices[0].logprobs.content)
check([(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content],
      "streamed logprobs equal the whole answer's")

# completions: echo + logprobs + max_tokens 0 scores the prompt (the first token has none)
prompt = "The capital of France is Paris"
r = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
lp = r.choices[0].logprobs
check(r.choices[0].text == prompt, f"echo: {r.choices[0].text!r}")
check(lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:]), f"{lp.token_logprobs}")
check(len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs), "parallel lists")
summary["echo_tokens"] = len(lp.tokens)


def continuation(cand):
    p = "The capital of France is"
    r = client.completions.create(model=model, prompt=p + cand, echo=True, logprobs=0, max_tokens=0)
    lp = r.choices[0].logprobs
    return sum(x for x, o in zip(lp.token_logprobs, lp.text_offset) if o >= len(p) and x is not None)


paris, london = continuation(" Paris"), continuation(" London")
summary["paris"], summary["london"] = paris, london
if smollm2:
    check(paris > london, f"' Paris' {paris} should score above ' London' {london}")

# n choices from one prompt
r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, n=3, temperature=1.0, seed=7)
check([c.index for c in r.choices] == [0, 1, 2], f"choices {r.choices}")
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=5, n=3, temperature=1.0, seed=7)
check(len(r.choices) == 3, f"{len(r.choices)} chat choices")
summary["n"] = len(r.choices)

# penalties and logit bias (OpenAI's fields): a +100 bias makes one token every choice
r = client.completions.create(model=model, prompt="a b c", max_tokens=3, temperature=0,
                              frequency_penalty=0.5, presence_penalty=0.5)
check(r.choices[0].text is not None, "penalties accepted")
tok = client.completions.create(model=model, prompt="x", max_tokens=1, temperature=0, logprobs=0)
r = client.completions.create(model=model, prompt="a b c", max_tokens=1, temperature=0, logprobs=0,
                              logit_bias={"42": 100})
# the forced token's log-probability is the model's own (the bias is not part of it)
check(math.isfinite(r.choices[0].logprobs.token_logprobs[0]), f"{r.choices[0].logprobs}")

# embeddings: the SDK asks for base64 and decodes it; floats when asked; unit vectors
e = client.embeddings.create(model=model, input=["The cat sat.", "A dog ran."])
check(len(e.data) == 2 and [d.index for d in e.data] == [0, 1], f"{e.data}")
vec = e.data[0].embedding
check(abs(math.sqrt(sum(x * x for x in vec)) - 1) < 1e-4, "unit length")
f = client.embeddings.create(model=model, input="The cat sat.", encoding_format="float")
check(max(abs(a - b) for a, b in zip(f.data[0].embedding, vec)) < 1e-6, "base64 and float agree")
check(e.usage.prompt_tokens > 0, f"{e.usage}")
summary["embedding_size"] = len(vec)

# tools (the server runs with --chat-template-file templates/chatml-tools.jinja): a required
# call is grammar-constrained, so even a random model's is a parseable get_weather call
# (a random tiny model would write a free string forever: it gets a choice of cities)
city = {"type": "string"} if smollm2 else {"type": "string", "enum": ["Paris", "London"]}
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": city}, "required": ["city"]}}}]
q = [{"role": "user", "content": "What is the weather in Paris?"}]
named = {"type": "function", "function": {"name": "get_weather"}}
calls = {}
for choice in ["required", named]:
    r = client.chat.completions.create(model=model, messages=q, tools=tools, tool_choice=choice,
                                       max_tokens=250, temperature=0)
    c = r.choices[0]
    tc = c.message.tool_calls
    check(tc and len(tc) == 1 and tc[0].type == "function", f"{choice}: {c.message}")
    check(tc[0].function.name == "get_weather" and tc[0].id.startswith("call_"), f"{tc[0]}")
    args = json.loads(tc[0].function.arguments)
    check(isinstance(args.get("city"), str), f"arguments {args}")
    check(c.finish_reason in ("tool_calls", "length"), f"finish {c.finish_reason}")
    if smollm2:
        check(c.finish_reason == "tool_calls" and "Paris" in args["city"], f"{c}")
    calls[str(choice)] = (r, args)
summary["tool_call"] = calls["required"][1]
# streamed: the deltas add up to the same call
acc = {}
finish = None
for chunk in client.chat.completions.create(model=model, messages=q, tools=tools, tool_choice=named,
                                            max_tokens=250, temperature=0, stream=True):
    if not chunk.choices:
        continue
    d = chunk.choices[0].delta
    finish = chunk.choices[0].finish_reason or finish
    for t in d.tool_calls or []:
        e = acc.setdefault(t.index, {"id": None, "name": "", "args": ""})
        e["id"] = t.id or e["id"]
        if t.function:
            e["name"] += t.function.name or ""
            e["args"] += t.function.arguments or ""
r, args = calls[str(named)]
check(list(acc) == [0] and acc[0]["name"] == "get_weather" and acc[0]["id"], f"streamed calls {acc}")
check(json.loads(acc[0]["args"]) == args, f"streamed {acc[0]['args']!r} vs {args}")
check(finish == r.choices[0].finish_reason, f"streamed finish {finish}")
# the tool's result goes back in the history (the SDK's own message object) and is answered
call = r.choices[0].message.tool_calls[0]
history = q + [r.choices[0].message,
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "sunny"})}]
a = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=40, temperature=0)
m = a.choices[0].message
check(m.content or m.tool_calls, f"the tool-result turn answers: {m}")
if smollm2:
    check(m.content and not m.tool_calls and a.choices[0].finish_reason == "stop", f"{a.choices[0]}")
summary["tool_answer"] = m.content

# an error is an OpenAI error: the SDK raises BadRequestError with the field named
try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=4, top_logprobs=50, logprobs=True)
    raise AssertionError("top_logprobs 50 was accepted")
except openai.BadRequestError as e:
    check("top_logprobs" in str(e), f"error names the field: {e}")

print(json.dumps(summary))
