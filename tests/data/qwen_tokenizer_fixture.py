"""Writes tests/data/qwen_tokenizer.json: the token ids of Qwen2.5-Coder-0.5B-Instruct's
own GGUF vocabulary for a set of strings, by an independent tokenizer (Hugging Face
`transformers` loading the tokenizer from the GGUF file itself).

Run once, from the repository root, with the model fetched:
    python3 -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install transformers==4.57.1 gguf==0.19.0
    /tmp/tokvenv/bin/python tests/data/qwen_tokenizer_fixture.py ~/.cache/troupe/models
"""
import json
import sys

import transformers.modeling_gguf_pytorch_utils as gguf_utils
from transformers import AutoTokenizer

# Reading a GGUF's tokenizer needs only its metadata (`return_tensors=False`), but
# transformers refuses without PyTorch installed; the tensors are never read here.
gguf_utils.is_torch_available = lambda: True

GGUF = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
TEXTS = [
    "The end.",
    "Hello, world! 12345 + 678 = 13023",
    "What is 17 * 23?",
    "How many kilometres is 26.2 miles?",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 3.14f; }",
    "   leading spaces and trailing tabs\t\t\n\n  ",
    "naïve café, déjà vu, Ångström, façade",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji: 🙂🚀👍🏽 and ❤️ in text",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    # Not here: text with `<tool_call>`. The GGUF marks it a user-defined token, which
    # llama.cpp always matches in text (and Qwen's own tokenizer.json lists it as an
    # added token), but transformers' GGUF converter spells it out as `<`, `tool`,
    # `_call`, `>`; tests/qwen_model.rs checks it is one token.
    "I'm sure they'll say it's John's; WE'VE DONE IT",
    "a\r\nb\rc\n\r\n",
    "    ",
    "0.000001 and 1e-10, 3,141,592",
]

tok = AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=GGUF)
cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS]
out = {
    "model": GGUF,
    "produced_by": "tests/data/qwen_tokenizer_fixture.py (transformers "
    + __import__("transformers").__version__
    + ", tokenizers "
    + __import__("tokenizers").__version__
    + ", AutoTokenizer.from_pretrained(dir, gguf_file=...), encode(add_special_tokens=False))",
    "cases": cases,
}
with open("tests/data/qwen_tokenizer.json", "w", encoding="utf-8") as f:
    # One case per line.
    head = json.dumps({k: v for k, v in out.items() if k != "cases"}, ensure_ascii=False)
    f.write(head[:-1] + ', "cases": [\n')
    f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))
    f.write("\n]}\n")
print(len(cases), "cases")
