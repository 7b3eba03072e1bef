#!/usr/bin/env bash
# Builds data/demo/lunyu.txt, the small built-in text `liandan up` trains on until the data
# pipeline's demo set lands: the Analects (论语) from the chinese-poetry npm package (MIT).
# Needs npm and python3; run from the repository root. The output is committed; CI does not run this.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent chinese-poetry@2.0.1 >/dev/null && tar xzf chinese-poetry-2.0.1.tgz package/dist/lunyu/lunyu.json)
python3 - "$work/package/dist/lunyu/lunyu.json" data/demo/lunyu.txt <<'PY'
import json, sys
chapters = json.load(open(sys.argv[1], encoding="utf-8"))
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for ch in chapters:
        out.write(ch["chapter"] + "\n")
        for p in ch["paragraphs"]:
            out.write(p + "\n")
        out.write("\n")
PY
wc -c data/demo/lunyu.txt
