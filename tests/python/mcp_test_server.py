"""An MCP server for troupe's MCP client tests (FastMCP, from the `mcp` package).

`python mcp_test_server.py` serves tools that misbehave on purpose: one sleeps past
the agent's timeout (and records that it was cancelled), one raises, one returns a
megabyte, one exits mid-call; one takes nested objects and enums; one adds a tool and
announces the changed list. `python mcp_test_server.py garbage` writes non-MCP text to
stdout instead, and `... badversion` answers `initialize` with an unknown protocol
version.
"""

import asyncio
import json
import os
import sys
from typing import Literal

MARKS = os.environ.get("TROUPE_TEST_MARKS", "")


def mark(what: str) -> None:
    if MARKS:
        with open(MARKS, "a") as f:
            f.write(what + "\n")


def raw(answer_version: str | None) -> None:
    """A stdio loop that is not a proper MCP server."""
    for line in sys.stdin:
        if answer_version is None:
            print("hello, I am not an MCP server", flush=True)
            continue
        msg = json.loads(line)
        if msg.get("method") == "initialize":
            reply = {
                "jsonrpc": "2.0",
                "id": msg["id"],
                "result": {
                    "protocolVersion": answer_version,
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "old", "version": "0"},
                },
            }
            print(json.dumps(reply), flush=True)


def main() -> None:
    from mcp.server.fastmcp import Context, FastMCP
    from pydantic import BaseModel

    mcp = FastMCP("faults")
    mark(f"pid {os.getpid()}")
    mark("started")

    @mcp.tool()
    async def slow() -> str:
        """Sleeps for a minute."""
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            mark("cancelled")
            raise
        return "done sleeping"

    @mcp.tool()
    def fail(reason: str) -> str:
        """Always fails with the reason given."""
        raise ValueError(f"failed on purpose: {reason}")

    @mcp.tool()
    def big() -> str:
        """Returns a megabyte of text."""
        return "0123456789abcdef" * 65536

    @mcp.tool()
    def crash() -> str:
        """Exits the server in the middle of the call."""
        mark("crashed")
        os._exit(3)

    class City(BaseModel):
        name: str
        country: Literal["France", "Japan", "Peru"]

    class Trip(BaseModel):
        to: City
        seat: Literal["window", "aisle"]
        nights: int

    @mcp.tool()
    def book(trip: Trip) -> str:
        """Books a trip to a city."""
        return "booked " + trip.model_dump_json()

    @mcp.tool()
    async def unlock(ctx: Context) -> str:
        """Adds the `secret` tool."""

        def secret() -> str:
            """Tells the secret word."""
            return "the secret word is pelican"

        mcp.add_tool(secret)
        await ctx.session.send_tool_list_changed()
        return "unlocked"

    mcp.run()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "garbage":
        print("this is not JSON-RPC", flush=True)
        raw(None)
    elif mode == "badversion":
        raw("1999-01-01")
    else:
        main()
