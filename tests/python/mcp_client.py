"""Drives `troupe mcp serve` as an MCP host would (the `mcp` package's client).

`python mcp_client.py stdio TROUPE ARGS...` starts the server on stdio;
`python mcp_client.py http URL` connects over streamable HTTP. Either way it lists
the tools, then calls `ask_calculator` twice in one session, and prints one JSON
object: the tool names and the two replies.
"""

import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client


async def drive(session: ClientSession) -> dict:
    await session.initialize()
    tools = await session.list_tools()
    replies = []
    for task in ["What is 17 * 23?", "What is 6 * 7?"]:
        r = await session.call_tool("ask_calculator", {"task": task})
        replies.append({"error": r.isError, "text": "".join(c.text for c in r.content if c.type == "text")})
    return {
        "tools": {t.name: t.inputSchema for t in tools.tools},
        "replies": replies,
    }


async def main() -> None:
    mode = sys.argv[1]
    if mode == "stdio":
        params = StdioServerParameters(command=sys.argv[2], args=sys.argv[3:])
        async with stdio_client(params) as (r, w):
            async with ClientSession(r, w) as s:
                out = await drive(s)
    else:
        async with streamablehttp_client(sys.argv[2]) as (r, w, _):
            async with ClientSession(r, w) as s:
                out = await drive(s)
    print(json.dumps(out))


asyncio.run(main())
