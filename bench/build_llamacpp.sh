#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-quantize once, into a cache directory, for the llama.cpp peer
# (bench/llamacpp_peer.py). Never run by the test suite.
#
# Source: the llama-cpp-python sdist on PyPI vendors llama.cpp, its convert_hf_to_gguf.py and gguf-py.
# Only the two tools are built (cmake + ninja, native CPU flags, static): this CPU's best kernels, and
# nothing of the Python binding. Idempotent: an existing build is reused. Prints the build directory.
#
#   bash bench/build_llamacpp.sh            # -> ~/.cache/edgemoe/llama.cpp-0.3.36
#   EDGEMOE_CACHE=/somewhere bash bench/build_llamacpp.sh
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${EDGEMOE_CACHE:-$HOME/.cache/edgemoe}"
ROOT="$CACHE/llama.cpp-$VERSION"
SRC="$ROOT/src/vendor/llama.cpp"
BUILD="$ROOT/build"
PIP="${PIP:-$(dirname "$0")/../.venv/bin/pip}"

if [ -x "$BUILD/bin/llama-bench" ] && [ -x "$BUILD/bin/llama-quantize" ]; then
  echo "$ROOT"
  exit 0
fi
for tool in cmake ninja c++; do
  command -v "$tool" >/dev/null || { echo "build_llamacpp: $tool is missing (apt-get install cmake ninja-build g++)" >&2; exit 1; }
done
mkdir -p "$ROOT"
if [ ! -d "$SRC" ]; then
  tmp=$(mktemp -d "$ROOT/download.XXXXXX")
  "$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
  mkdir -p "$tmp/x" && tar xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp/x"
  rm -rf "$ROOT/src" && mv "$tmp/x/llama_cpp_python-$VERSION" "$ROOT/src" && rm -rf "$tmp"
fi
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_CURL=OFF >&2
cmake --build "$BUILD" --target llama-bench llama-quantize -j "$(nproc)" >&2
echo "$ROOT"
