#!/usr/bin/env bash
# Build llama.cpp's llama-server from the vendored sources of the same pinned llama-cpp-python sdist that slmops
# runs on, so both sides use the same llama.cpp. Cached under bench/.cache; prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")"
ver=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' ../pyproject.toml | head -1)
cache=".cache/llama.cpp-$ver"
bin="$cache/build/bin/llama-server"
if [ ! -x "$bin" ]; then
  mkdir -p "$cache"
  python3 -m pip download --no-deps --no-binary :all: -q -d "$cache" "llama-cpp-python==$ver"
  tar -xzf "$cache"/llama_cpp_python-"$ver".tar.gz -C "$cache"
  src="$cache/llama_cpp_python-$ver/vendor/llama.cpp"
  cmake -S "$src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
  cmake --build "$cache/build" --target llama-server -j "$(nproc)" >/dev/null
fi
echo "$bin"
