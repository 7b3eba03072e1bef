#!/usr/bin/env bash
# Fetches the full chinese-poetry corpus (npm package chinese-poetry@2.0.1, MIT, "Copyright (c)
# 2016 JackeyGao") into DIR (default runs/corpus/chinese-poetry): the JSON collections under
# dist/, without quantangshi/error (copies kept by the package for error reports), rank/ and
# strains/ (popularity counts and tonal patterns, not text), and without the
# author biographies (no poem text). Used by the full-corpus run and the data benchmark:
#   bash scripts/fetch_poetry.sh && liandan data prepare runs/corpus/chinese-poetry --t2s --out runs/poetry
set -euo pipefail
dest=${1:-runs/corpus/chinese-poetry}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent chinese-poetry@2.0.1 >/dev/null && tar xzf chinese-poetry-2.0.1.tgz)
rm -rf "$dest"
mkdir -p "$dest"
cp -r "$work/package/dist/." "$dest/"
cp "$work/package/LICENSE" "$dest/LICENSE"
rm -rf "$dest/quantangshi/error" "$dest/rank" "$dest/strains"
find "$dest" -name 'authors*.json' -delete
du -sh "$dest"
find "$dest" -name '*.json' | wc -l
