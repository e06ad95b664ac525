"""The OpenAI Agents SDK runs an agent with one function tool against `troupe
serve` (its Chat Completions model pointed at the server) to a final answer.

Environment: TROUPE_URL, TROUPE_MODEL_ID.
"""

import os

from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner,
                    function_tool, set_tracing_disabled)
from agents.items import ToolCallItem, ToolCallOutputItem
from openai import AsyncOpenAI

set_tracing_disabled(True)
URL = os.environ["TROUPE_URL"]
MODEL = os.environ["TROUPE_MODEL_ID"]
calls = []


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    calls.append(city)
    return f"It is sunny and 21 C in {city}."


client = AsyncOpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0)
agent = Agent(
    name="Weather",
    instructions="You answer questions about the weather using your tool.",
    tools=[get_weather],
    model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
    model_settings=ModelSettings(max_tokens=96, temperature=0),
)
# One demonstrated exchange before the question, as troupe's own agents carry
# (`AgentConfig::examples`): a 135M model copies a shown exchange far more reliably
# than it follows instructions.
example = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"type": "function_call", "call_id": "call_0", "name": "get_weather", "arguments": '{"city":"Rome"}'},
    {"type": "function_call_output", "call_id": "call_0", "output": "It is rainy and 12 C in Rome."},
    {"role": "assistant", "content": "It is rainy and 12 C in Rome."},
]
question = {"role": "user", "content": "What is the weather in Paris?"}
result = Runner.run_sync(agent, example + [question], max_turns=4)
kinds = [type(i).__name__ for i in result.new_items]
print("items:", kinds)
print("final:", repr(result.final_output))
assert calls == ["Paris"], calls
assert any(isinstance(i, ToolCallItem) for i in result.new_items)
assert any(isinstance(i, ToolCallOutputItem) for i in result.new_items)
assert isinstance(result.final_output, str) and "sunny" in result.final_output.lower(), result.final_output
