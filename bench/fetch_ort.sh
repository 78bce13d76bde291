#!/usr/bin/env bash
# Fetches ONNX Runtime's CPU runtime for bench/compare_ort.py: the npm package onnxruntime-node,
# which carries libonnxruntime.so and its Node.js binding. --ignore-scripts skips the package's
# install script, which would download GPU providers from nuget; the CPU runtime is in the package
# itself. Nothing is built or installed system-wide; the files land in build/ort.
# Usage: bash bench/fetch_ort.sh [version]   (needs node and npm)
set -euo pipefail
version="${1:-1.30.0}"
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$root/build/ort"
cd "$root/build/ort"
[ -f package.json ] || echo '{"private": true}' >package.json
npm install --silent --no-audit --no-fund --ignore-scripts "onnxruntime-node@$version"
echo "BLOCKATTN_ORT_DIR=$root/build/ort/node_modules"
