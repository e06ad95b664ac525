"""Eight sessions of three turns through nginx in front of two `troupe serve`
replicas (routing by `X-Session-Id`): every later turn is served by the replica
holding the session's cache; then one replica is killed and its sessions move to
the other, re-prefilling, none failing.

Environment: PROXY_URL, REPLICA_URLS (comma-separated), VICTIM_PID (the replica to
kill after turn 2), VICTIM_URL, TROUPE_MODEL_ID.
"""

import json
import os
import signal
import socket
import time
import urllib.request

import httpx

PROXY = os.environ["PROXY_URL"]
REPLICAS = os.environ["REPLICA_URLS"].split(",")
VICTIM_PID = int(os.environ["VICTIM_PID"])
VICTIM = os.environ["VICTIM_URL"]
MODEL = os.environ["TROUPE_MODEL_ID"]

histories = {f"user-{i}": [{"role": "system", "content": f"Assistant {i}."}] for i in range(8)}


def turn(http, sid, t):
    h = histories[sid]
    h.append({"role": "user", "content": f"Turn {t} of {sid}: say something."})
    r = http.post(PROXY + "/v1/chat/completions", headers={"X-Session-Id": sid},
                  json={"model": MODEL, "messages": h, "max_tokens": 8})
    assert r.status_code == 200, (sid, t, r.status_code, r.text)
    body = r.json()
    h.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    assert r.headers["x-session-id"] == sid
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def holders():
    """Which replica holds each session."""
    out = {}
    for url in REPLICAS:
        for sid in histories:
            try:
                urllib.request.urlopen(f"{url}/v1/sessions/{sid}")
                out.setdefault(sid, []).append(url)
            except urllib.error.HTTPError as e:
                assert e.code == 404, e
    return out


with httpx.Client(timeout=60) as http:
    for t in range(2):
        cached = {sid: turn(http, sid, t) for sid in histories}
        if t > 0:
            assert all(c > 0 for c in cached.values()), cached
    where = holders()
    assert all(len(v) == 1 for v in where.values()), where
    on_victim = [s for s, v in where.items() if v == [VICTIM]]
    print("sessions by replica:", json.dumps(where))
    assert on_victim and len(on_victim) < len(histories), where
    os.kill(VICTIM_PID, signal.SIGKILL)
    # Dead once its port refuses connections (kill only sends the signal).
    host, port = VICTIM.removeprefix("http://").split(":")
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            time.sleep(0.01)
        except OSError:
            break
    cached = {sid: turn(http, sid, 2) for sid in histories}
    print("turn 3 cached tokens:", cached)
    for sid, c in cached.items():
        if sid in on_victim:
            assert c == 0, (sid, c)  # moved: re-prefilled on the other replica
        else:
            assert c > 0, (sid, c)
    print(len(on_victim), "sessions moved and re-prefilled; none failed")
