#!/usr/bin/env bash
# Builds llama-cpp-python from its PyPI sdist with this folder's patches applied, as a wheel tagged
# VERSION+qanat1 (Qanat's executor reads the tag: the AMX kernels are used only where the fix is in).
# Usage: build-wheel.sh PIP VERSION WHEELHOUSE. CMAKE_ARGS and CMAKE_BUILD_PARALLEL_LEVEL come from the caller.
set -euo pipefail
pip=$1 version=$2 wheelhouse=$3
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$pip" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version"
for patch in "$here"/*.patch; do (cd "$src" && git apply -p1 "$patch"); done
sed -i "s/^__version__ = \"$version\"/__version__ = \"$version+qanat1\"/" "$src/llama_cpp/__init__.py"
grep -q "+qanat1" "$src/llama_cpp/__init__.py"
mkdir -p "$wheelhouse.tmp"
"$pip" wheel --quiet --no-deps -w "$wheelhouse.tmp" "$src"
rm -rf "$wheelhouse" && mv "$wheelhouse.tmp" "$wheelhouse"
