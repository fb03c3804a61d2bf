#!/usr/bin/env bash
# llama.cpp as a real client for the `llamacpp` test tier:
# - llama-cpp-python into .venv (pip builds llama.cpp from source: ~5.5 min on 2 cores, then the
#   wheel is cached by pip);
# - the same version's source archive unpacked into .cache/llamacpp-src, whose
#   vendor/llama.cpp/convert_hf_to_gguf.py the tests run as an external tool (never copied into
#   this repository). One version for both, so the converter and the runtime agree.
# `--source-only`: just the archive (the `templates` and `realtok` tiers read Google's chat
# templates and the Gemma 4 vocab GGUF from it; no build).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${LLAMACPP_VERSION:-0.3.36}"
SOURCE_ONLY=0
[ "${1:-}" = "--source-only" ] && SOURCE_ONLY=1
PIP="${PYTHON:-.venv/bin/python} -m pip"
DEST=.cache/llamacpp-src
CONVERTER="$DEST/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"

if [ "$SOURCE_ONLY" = 0 ] && ! ${PYTHON:-.venv/bin/python} -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  $PIP install "llama-cpp-python==$VERSION"
fi
if [ ! -f "$CONVERTER" ]; then
  mkdir -p "$DEST"
  $PIP download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DEST"
  tar -xzf "$DEST/llama_cpp_python-$VERSION.tar.gz" -C "$DEST"
fi
if [ "$SOURCE_ONLY" = 1 ]; then echo "llama-cpp-python $VERSION source: $DEST"; exit 0; fi
echo "llama-cpp-python $VERSION ready; converter: $CONVERTER"
