"""The API key and the in-flight limit of a `troupe serve` started with
`--api-key secret --max-in-flight 1`: 401 without the key, 503 past the limit.

Environment: TROUPE_URL, TROUPE_MODEL_ID.
"""

import os

import httpx
import openai

URL = os.environ["TROUPE_URL"]
MODEL = os.environ["TROUPE_MODEL_ID"]
msgs = [{"role": "user", "content": "Hello."}]

try:
    openai.OpenAI(base_url=URL + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4)
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.body["code"] == "invalid_api_key", e.body
    print("wrong key: 401")

client = openai.OpenAI(base_url=URL + "/v1", api_key="secret", max_retries=0)
assert client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4).choices

# One long stream holds the only slot; a second request meanwhile gets a 503.
with httpx.Client(timeout=60) as http:
    body = {"model": MODEL, "messages": msgs, "stream": True, "max_tokens": 400, "ignore_eos": True}
    with http.stream("POST", URL + "/v1/chat/completions", json=body,
                     headers={"Authorization": "Bearer secret"}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(lines)
        try:
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
            raise AssertionError("a request past --max-in-flight was accepted")
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.body["code"] == "server_busy", e.body
            print("past the in-flight limit: 503")
