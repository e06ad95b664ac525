"""The official `openai` client against a running `troupe serve` (started by
tests/serve_openai.rs): completions, streaming, a tool call round trip, JSON
Schema output, cache reuse across a resent conversation, and the error statuses.

Environment: TROUPE_URL (http://127.0.0.1:PORT), TROUPE_MODEL_ID.
Each check prints one line; any failure raises (a non-zero exit).
"""

import json
import os
import urllib.error
import urllib.request

import jsonschema
import openai

URL = os.environ["TROUPE_URL"]
MODEL = os.environ["TROUPE_MODEL_ID"]
client = openai.OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0)

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}


def ask(messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


# 1. A plain completion, and the same one streamed: the same greedy text.
msgs = [SYSTEM, {"role": "user", "content": "Name three colours."}]
plain = ask(msgs, max_tokens=24, temperature=0)
text = plain.choices[0].message.content
assert isinstance(text, str) and text, plain
assert plain.choices[0].finish_reason in ("stop", "length"), plain
assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > 0, plain.usage
assert plain.model == MODEL
print("non-streamed:", repr(text), plain.usage.completion_tokens, "tokens")

chunks = list(
    ask(msgs, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True})
)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert streamed == text, (streamed, text)
assert finishes == [plain.choices[0].finish_reason], finishes
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
print("streamed: same text,", len(chunks), "chunks, usage chunk last")

# 2. A tool call round trip.
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}]
conv = [SYSTEM, {"role": "user", "content": "What is the weather in Paris?"}]
r = ask(conv, tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=64)
call_msg = r.choices[0].message
assert r.choices[0].finish_reason == "tool_calls", r
assert call_msg.tool_calls and call_msg.tool_calls[0].function.name == "get_weather", call_msg
args = json.loads(call_msg.tool_calls[0].function.arguments)
jsonschema.validate(args, tools[0]["function"]["parameters"])
print("tool call:", call_msg.tool_calls[0].function.arguments)

# The same call streamed comes as tool-call deltas.
chunks = list(ask(conv, tools=tools, tool_choice="required", max_tokens=64, stream=True))
deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
assert deltas and deltas[0].function.name == "get_weather", chunks
streamed_args = "".join(d.function.arguments or "" for d in deltas)
jsonschema.validate(json.loads(streamed_args), tools[0]["function"]["parameters"])
assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
print("streamed tool call:", streamed_args)

conv += [
    {"role": "assistant", "content": None, "tool_calls": [tc.model_dump() for tc in call_msg.tool_calls]},
    {"role": "tool", "tool_call_id": call_msg.tool_calls[0].id, "content": "Sunny, 21 C."},
]
final = ask(conv, tools=tools, tool_choice="none", max_tokens=48)
assert final.choices[0].message.content and not final.choices[0].message.tool_calls, final
assert final.usage.prompt_tokens_details.cached_tokens > 0, final.usage
print("final answer:", repr(final.choices[0].message.content), "cached", final.usage.prompt_tokens_details.cached_tokens)

# 3. response_format json_schema: the output validates.
person = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
r = ask([{"role": "user", "content": "Describe a person as JSON."}], max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}})
out = json.loads(r.choices[0].message.content)
jsonschema.validate(out, person)
print("json_schema:", out)

# A keyword the grammar cannot enforce: strict refuses it naming it, lenient checks it.
tags = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3, "uniqueItems": True}}, "required": ["tags"]}
try:
    ask([{"role": "user", "content": "Tags?"}], max_tokens=32,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": tags, "strict": True}})
    raise AssertionError("a strict schema with uniqueItems was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "uniqueItems" in str(e), e
    print("strict uniqueItems: 400 naming the keyword")
try:
    r = ask([{"role": "user", "content": "Give tags as JSON."}], max_tokens=32,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": tags}})
    jsonschema.validate(json.loads(r.choices[0].message.content), tags)
    print("lenient uniqueItems: output validates:", r.choices[0].message.content)
except openai.UnprocessableEntityError as e:
    assert "uniqueItems" in str(e), e
    print("lenient uniqueItems: violation reported (422):", e.body)

# 4. A conversation resent in full reuses its cache on the second turn.
turn1 = [SYSTEM, {"role": "user", "content": "Say hello to Ada."}]
a1 = ask(turn1, max_tokens=16)
turn2 = turn1 + [{"role": "assistant", "content": a1.choices[0].message.content},
                 {"role": "user", "content": "And to Alan."}]
a2 = ask(turn2, max_tokens=16)
cached = a2.usage.prompt_tokens_details.cached_tokens
assert cached >= a1.usage.prompt_tokens, (a1.usage, a2.usage)
print("second turn: cached", cached, "of", a2.usage.prompt_tokens, "prompt tokens")

# 5. Session routes: show, fork (the fork continues from the shared prefix), delete.
raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=turn2, max_tokens=8)
sid = raw.headers["x-session-id"]
shown = json.load(urllib.request.urlopen(f"{URL}/v1/sessions/{sid}"))
assert len(shown["messages"]) == len(turn2) + 1 and shown["cache_bytes"] > 0, shown
req = urllib.request.Request(f"{URL}/v1/sessions/{sid}/fork", method="POST")
fork = json.load(urllib.request.urlopen(req))["id"]
later = turn2 + [{"role": "assistant", "content": raw.parse().choices[0].message.content},
                 {"role": "user", "content": "And to Grace."}]
f = client.chat.completions.create(model=MODEL, messages=later, max_tokens=8, extra_headers={"X-Session-Id": fork})
assert f.usage.prompt_tokens_details.cached_tokens >= shown["cached_tokens"] > 0, (f.usage, shown)
req = urllib.request.Request(f"{URL}/v1/sessions/{sid}", method="DELETE")
assert json.load(urllib.request.urlopen(req))["deleted"] is True
try:
    urllib.request.urlopen(f"{URL}/v1/sessions/{sid}")
    raise AssertionError("a deleted session is still there")
except urllib.error.HTTPError as e:
    assert e.code == 404, e
print("sessions: shown, forked (cached", f.usage.prompt_tokens_details.cached_tokens, "), deleted")

# 6. Errors: status and body.
try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body
    print("unknown model: 404", e.body["message"])
try:
    ask(msgs, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    raise AssertionError("a bad schema was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "response_format", e.body
    print("bad schema: 400", e.body["message"][:100])
try:
    ask([{"role": "user", "content": "word " * 12000}], max_tokens=8)
    raise AssertionError("an over-long prompt was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded", e.body
    print("over-long prompt: 400", e.body["message"])
try:
    list(ask([{"role": "user", "content": "word " * 12000}], max_tokens=8, stream=True))
    raise AssertionError("an over-long streamed prompt was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded", e.body
    print("over-long streamed prompt: 400 before any event")

# 7. The other routes.
models = client.models.list()
assert [m.id for m in models.data] == [MODEL]
health = json.load(urllib.request.urlopen(URL + "/health"))
assert health["status"] == "ok"
metrics = urllib.request.urlopen(URL + "/metrics").read().decode()
assert "troupe_tokens_reused_total" in metrics and "troupe_kv_live_bytes" in metrics
print("models, health, metrics: ok")
