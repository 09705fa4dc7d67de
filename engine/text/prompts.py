"""Prompts as AUTOMATIC1111 users write them: emphasis, BREAK, and prompts longer than CLIP's 77 tokens.

Syntax (A1111's): `(word)` x1.1, `((word))` x1.21, `(word:1.5)` x1.5, `[word]` /1.1, `\\(` a literal
bracket, `BREAK` starts a new chunk. Unclosed brackets apply to the end of the prompt, as in A1111.

Encoding: the prompt's tokens are split into chunks of 75; each chunk is framed as BOS + 75 + EOS (padded
with the tokenizer's pad token) and encoded alone, and the outputs are concatenated along the sequence, so a
150-token prompt gives a (1, 154, dim) embedding. The text encoder only ever sees 77 tokens, which is what
OpenVINO's static-shape text encoder needs: one call per chunk. Weights multiply each token's output vector,
then the chunk is rescaled so its mean equals the unweighted mean (A1111's method): a weighted token stands
out against the others without shifting the whole embedding. The UNet reads any sequence length.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from engine.errors import UserError

CHUNK = 75  # tokens per chunk between BOS and EOS
MAX_CHUNKS = 20  # 1500 tokens: far beyond any real prompt, and bounds what one request can ask of the encoder
MAX_CHARS = 20_000  # checked before parsing and tokenizing: 1500 tokens are rarely over 10 000 characters
ROUND, SQUARE = 1.1, 1 / 1.1
_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:|\\")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float  # BREAK fragments carry weight -1 and no text


def parse_weights(prompt: str) -> list[Fragment]:
    """'a (red:1.5) [circle]' -> [('a ', 1), ('red', 1.5), (' ', 1), ('circle', 1/1.1)], runs of equal weight
    merged."""
    parts: list[list] = []  # [text, weight]
    rounds: list[int] = []  # where each open bracket's range starts in `parts`
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _TOKEN.finditer(prompt or ""):
        text, number = match.group(0), match.group(1)
        if text.startswith("\\") and len(text) == 2:
            parts.append([text[1], 1.0])
        elif text == "(":
            rounds.append(len(parts))
        elif text == "[":
            squares.append(len(parts))
        elif number is not None and rounds:
            try:
                scale(rounds.pop(), float(number))
            except ValueError:  # "(a:1.2.3)": keep the text, as A1111 would show it
                parts.append([text, 1.0])
        elif text == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif text == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            for i, piece in enumerate(_BREAK.split(text)):
                if i:
                    parts.append(["", -1.0])
                parts.append([piece, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[list] = []
    for text, weight in parts:
        if merged and merged[-1][1] == weight and weight != -1.0:
            merged[-1][0] += text
        elif text or weight == -1.0:
            merged.append([text, weight])
    return [Fragment(t, w) for t, w in merged] or [Fragment("", 1.0)]


@dataclass(frozen=True)
class Words:
    """Names that stand for token ids of their own (textual-inversion embeddings), matched as whole words in any
    case, as A1111 matches the name's tokens. `ids`: lower-case name -> its ids past the vocabulary."""

    ids: Mapping[str, tuple[int, ...]]
    pattern: re.Pattern | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = sorted(self.ids, key=len, reverse=True)  # the longest name first where one starts another
        pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])", re.IGNORECASE)
        object.__setattr__(self, "pattern", pattern if names else None)

    def split(self, text: str) -> list[str | tuple[int, ...]]:
        """'a photo of myemb' -> ['a photo of ', (ids...)]: text pieces and the ids of the names between them."""
        if self.pattern is None:
            return [text]
        parts: list[str | tuple[int, ...]] = []
        for i, piece in enumerate(self.pattern.split(text)):
            ids = self.ids.get(piece.lower()) if i % 2 else None
            if ids is not None:
                parts.append(ids)
            elif piece:
                parts.append(piece)
        return parts


@dataclass
class Chunks:
    """A prompt as token chunks of at most CHUNK, each with a weight per token."""

    tokens: list[list[int]]
    weights: list[list[float]]
    count: int  # tokens in the prompt, BOS/EOS not counted

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for ws in self.weights for w in ws)


def tokenize(tokenizer, prompt: str, words: Words | None = None) -> Chunks:
    """The prompt's tokens in chunks of 75; BREAK closes a chunk early. An empty prompt is one empty chunk. An
    embedding's n ids stay in one chunk: one that does not fit starts the next (as A1111 does)."""
    if len(prompt) > MAX_CHARS:  # styles may have made it longer than the request's own limit
        raise UserError(f"The prompt is {len(prompt)} characters (with its styles); the limit is {MAX_CHARS}.")
    tokens: list[list[int]] = [[]]
    weights: list[list[float]] = [[]]
    count = 0
    fragments = parse_weights(prompt)
    pieces = [(words.split(f.text) if words else [f.text]) if f.weight != -1.0 and f.text else []
              for f in fragments]
    texts = [p for ps in pieces for p in ps if isinstance(p, str)]
    ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids if texts else []
    ids_of = iter(ids)
    for fragment, parts in zip(fragments, pieces):
        if fragment.weight == -1.0:
            if tokens[-1]:
                tokens.append([])
                weights.append([])
            continue
        if not fragment.text:
            continue
        for part in parts:
            run = next(ids_of) if isinstance(part, str) else part
            if not isinstance(part, str) and tokens[-1] and len(tokens[-1]) + len(run) > CHUNK:
                tokens.append([])
                weights.append([])
            for token in run:
                if len(tokens[-1]) == CHUNK:
                    tokens.append([])
                    weights.append([])
                tokens[-1].append(token)
                weights[-1].append(fragment.weight)
                count += 1
    if len(tokens) > 1 and not tokens[-1]:  # a BREAK at the very end
        tokens.pop()
        weights.pop()
    if len(tokens) > MAX_CHUNKS:
        raise UserError(f"The prompt is {count} tokens; the limit is {MAX_CHUNKS * CHUNK} "
                        f"({MAX_CHUNKS} chunks of {CHUNK}).")
    return Chunks(tokens, weights, count)


def chunk_ids(tokenizer, tokens: list[int]) -> list[int]:
    """BOS + tokens + EOS, padded to 77 with the tokenizer's pad token (what diffusers feeds the encoder)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
    return ids + [pad] * (CHUNK + 2 - len(ids))


def _run_encoder(encoder, ids: list[int], device, hidden_layer: str):
    """One 77-token call: (hidden states (1, 77, dim), pooled output or None)."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    if hidden_layer == "last":
        out = encoder(input_ids)
        return out[0], None
    out = encoder(input_ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _apply_weights(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's emphasis: scale each token's vector by its weight, then restore the chunk's mean."""
    if all(w == 1.0 for w in weights):
        return z
    full = torch.tensor([1.0, *weights, *([1.0] * (CHUNK + 1 - len(weights)))], dtype=z.dtype, device=z.device)
    before = z.mean()
    z = z * full.reshape(1, -1, 1)
    after = z.mean()
    # No mean to restore where it is ~0 (a final LayerNorm without bias): the ratio would be rounding noise, or NaN
    # where a CPU's summation order makes it exactly 0.
    floor = 1e-4 * z.abs().mean()
    if after.abs() <= floor or before.abs() <= floor:
        return z
    return z * (before / after)


def text_encoders(pipe, sdxl: bool):
    """(component name, tokenizer, encoder) for each text encoder, and which hidden layer the pipeline reads."""
    if sdxl:
        found = [(n, t, e) for n, t, e in (("text_encoder", pipe.tokenizer, pipe.text_encoder),
                                           ("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2))
                 if t is not None and e is not None]
        return found, "penultimate"
    return [("text_encoder", pipe.tokenizer, pipe.text_encoder)], "last"


def encode_chunks(pipe, sdxl: bool, prompt: str, device, chunks_wanted: int = 0,
                  words: Mapping[str, Words] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeddings (1, 77 x chunks, dim), pooled (1, dim) for SDXL else None); at least `chunks_wanted` chunks
    (empty chunks pad a shorter prompt, as A1111 pads the negative prompt to the prompt's length). `words`: each
    encoder's embedding names (by component name)."""
    found, layer = text_encoders(pipe, sdxl)
    per_encoder = [tokenize(tok, prompt, (words or {}).get(name)) for name, tok, _ in found]
    n = max(chunks_wanted, *(len(c.tokens) for c in per_encoder))
    pooled = None
    outputs = []
    for i in range(n):
        parts = []
        for (_, tok, enc), chunks in zip(found, per_encoder):
            tokens = chunks.tokens[i] if i < len(chunks.tokens) else []
            z, pool = _run_encoder(enc, chunk_ids(tok, tokens), device, layer)
            if i == 0 and pool is not None:
                pooled = pool  # A1111 and diffusers take the pooled output of the first chunk (encoder 2)
            parts.append(z)
        z = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        weights = per_encoder[0].weights[i] if i < len(per_encoder[0].weights) else []
        outputs.append(_apply_weights(z, weights))
    return torch.cat(outputs, dim=1), pooled


def chunk_count(pipe, sdxl: bool, prompt: str, words: Mapping[str, Words] | None = None) -> int:
    found, _ = text_encoders(pipe, sdxl)
    return max(len(tokenize(tok, prompt, (words or {}).get(name)).tokens) for name, tok, _ in found)


def token_count(tokenizer, prompt: str, words: Words | None = None) -> int:
    return tokenize(tokenizer, prompt, words).count
