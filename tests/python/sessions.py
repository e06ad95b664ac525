"""Ten concurrent sessions of three turns each over HTTP, each resending its whole
history (no session id): every turn after the first computes only its new tokens.
Then a stream dropped mid-way frees its slot within a step of the drop.

Environment: TROUPE_URL, TROUPE_MODEL_ID.
"""

import asyncio
import os
import time
import urllib.request

import httpx
import openai

URL = os.environ["TROUPE_URL"]
MODEL = os.environ["TROUPE_MODEL_ID"]


def metrics():
    text = urllib.request.urlopen(URL + "/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("troupe_"):
            name, value = line.rsplit(" ", 1)
            out[name[len("troupe_"):]] = float(value)
    return out


async def session(client, i):
    history = [{"role": "system", "content": f"You are assistant number {i}. Answer in one sentence."}]
    rows = []
    for turn in range(3):
        history.append({"role": "user", "content": f"Session {i}, question {turn}: name a fruit."})
        r = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
        u = r.usage
        rows.append((u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens))
        history.append({"role": "assistant", "content": r.choices[0].message.content})
    return rows


async def main():
    client = openai.AsyncOpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0)
    before = metrics()
    results = await asyncio.gather(*(session(client, i) for i in range(10)))
    after = metrics()
    for i, rows in enumerate(results):
        for t in range(1, 3):
            prompt, cached, _ = rows[t]
            prev_prompt, _, prev_gen = rows[t - 1]
            # Everything the previous turn fed or generated is reused, except its last
            # sampled token (never fed) and the end-of-turn tokens the template adds.
            assert cached >= prev_prompt + prev_gen - 1, (i, t, rows)
            new = prompt - cached
            assert new < 40, (i, t, rows)
        print("session", i, rows)
    recomputed = after["tokens_recomputed_total"] - before.get("tokens_recomputed_total", 0)
    assert recomputed == 0, recomputed
    print("recomputed tokens:", recomputed)

    # A stream dropped mid-way: its sequence leaves the batch within a step.
    async with httpx.AsyncClient(timeout=60) as http:
        body = {"model": MODEL, "stream": True, "max_tokens": 4000, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Count to a thousand."}]}
        async with http.stream("POST", URL + "/v1/chat/completions", json=body) as resp:
            n = 0
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    n += 1
                if n >= 5:
                    break
            assert metrics()["running"] == 1
        # The connection is closed now.
        steps_at_drop = metrics()["steps_total"]
    deadline = time.time() + 30
    while True:
        m = metrics()
        if m["running"] == 0:
            break
        assert time.time() < deadline, m
        await asyncio.sleep(0.01)
    steps = m["steps_total"] - steps_at_drop
    print("dropped stream freed after", steps, "more steps")
    assert steps <= 2, steps


asyncio.run(main())
