#!/usr/bin/env bash
# Fetches ggml's prebuilt CPU libraries for bench/compare_ggml_bench.cpp: the npm package
# @node-llama-cpp/linux-x64 ships llama.cpp's shared libraries, one libggml-cpu-<arch>.so per
# instruction-set level. Nothing is built or installed system-wide; the files land in build/ggml.
# Usage: bash bench/fetch_ggml.sh   then   export BLOCKATTN_GGML_DIR=build/ggml/package/bins/linux-x64
set -euo pipefail
version="${1:-3.22.1}"
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$root/build/ggml"
cd "$root/build/ggml"
npm pack --silent "@node-llama-cpp/linux-x64@$version" >/dev/null
tar xzf "node-llama-cpp-linux-x64-$version.tgz"
echo "BLOCKATTN_GGML_DIR=$root/build/ggml/package/bins/linux-x64"
