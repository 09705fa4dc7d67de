"""The project's own CLIP-style BPE vocabulary (shipped in assets/tokenizer).

Real CLIP vocabularies cannot be downloaded here, so the built-in models use this one:
every byte as a symbol (any text tokenizes), plus whole-word merges for words that
prompts use often, so common words cost one token. `python -m engine.vocab` rewrites
the files; a test checks the shipped files match this builder.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "assets" / "tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77

WORDS = """
a an the of on in at to with and or by for from under over near behind beside above below between
top bottom left right center middle corner side edge background foreground front back
small large big tiny huge little medium tall short wide narrow thin thick round square
circle circles square squares triangle triangles star stars heart hexagon diamond ring cross line
shape shapes dot dots stripe stripes
red orange yellow green blue purple pink brown black white gray grey cyan magenta teal gold silver
dark light bright pale deep vivid pastel neon
one two three four five many several pair group
photo photograph picture painting drawing sketch illustration render portrait landscape closeup
cat dog bird horse fish cow person man woman girl boy child face eyes hair hand tree trees
flower flowers forest mountain mountains river lake sea ocean beach sky sun moon cloud clouds
house city street road car castle room window door table chair book cup
night day morning evening sunset sunrise winter summer spring autumn snow rain fog
detailed highly high quality best masterpiece realistic photorealistic sharp focus cinematic
lighting soft hard studio art style digital oil watercolor anime cartoon 4k 8k hd
blurry blur low worst ugly deformed noise noisy jpeg artifacts bad text watermark signature
""".split()


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte -> printable unicode map, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    by_byte = dict(zip(bs, cs))
    return [chr(by_byte[b]) for b in range(256)]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE on one word (lowest-rank pair first), as the CLIP tokenizer does it."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_vocab() -> tuple[dict[str, int], list[str]]:
    """Vocab and merges: bytes, bytes at word end, then merges until every listed word is one token."""
    symbols = _byte_symbols()
    tokens: list[str] = symbols + [s + "</w>" for s in symbols]
    known = set(tokens)
    ranks: dict[tuple[str, str], int] = {}
    words = list(dict.fromkeys(w.lower() for w in WORDS))
    for _ in range(20):  # a merge added for one word can split another; repeat until stable
        changed = False
        for word in words:
            parts = _bpe(word, ranks)
            while len(parts) > 1:  # join what is left, left to right
                pair = (parts[0], parts[1])
                ranks.setdefault(pair, len(ranks))
                parts[0:2] = [parts[0] + parts[1]]
                if parts[0] not in known:
                    known.add(parts[0])
                    tokens.append(parts[0])
                changed = True
        if not changed:
            break
    tokens += [BOS, EOS]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return {t: i for i, t in enumerate(tokens)}, merges


def tokenizer_files() -> dict[str, str]:
    vocab, merges = build_vocab()
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=0) + "\n",
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


def write_tokenizer(directory: Path = TOKENIZER_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files().items():
        (directory / name).write_text(text, encoding="utf-8")


def load_tokenizer(directory: Path = TOKENIZER_DIR):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory))


if __name__ == "__main__":
    write_tokenizer()
    print(f"wrote {TOKENIZER_DIR}")
