"""A tiny, deterministic numpy transformer language model for Triton's Python backend.

Why it exists: Shepherd needs a real inference server to test batching, routing, token
accounting and caching on machines without a GPU or model weights. This model does honest
work (a 2-layer causal transformer with a KV cache, run over the whole batch at once), so
batch cost grows sub-linearly with batch size just like a real LLM server, while staying
cheap enough to run many times in tests. Weights are drawn from a seeded generator, so the
same prompt gives the same completion on every run and across restarts.

The numpy part (`TinyLM`) does not import Triton, so it can be timed and tested directly;
`TritonPythonModel` is the thin adapter that Triton loads.
"""

from __future__ import annotations

# Import the backend utils before numpy: the stub's interpreter runs in isolated mode and only
# sees the base interpreter's site-packages; deploy.local.triton generates this module as a
# shim that first puts the launching venv's site-packages on sys.path. Importing numpy first
# would bind whatever numpy the base interpreter has (or fail when it has none).
try:  # Only present inside the Triton Python backend stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised when imported outside Triton.
    pb_utils = None

import json
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# Output words. Generated token ids map onto these so completions read like (odd) English.
WORDS: tuple[str, ...] = (
    ".",
    ",",
    "the",
    "a",
    "an",
    "and",
    "or",
    "but",
    "of",
    "to",
    "in",
    "on",
    "at",
    "for",
    "with",
    "from",
    "by",
    "about",
    "into",
    "over",
    "after",
    "before",
    "under",
    "between",
    "through",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "has",
    "have",
    "had",
    "do",
    "does",
    "did",
    "can",
    "could",
    "will",
    "would",
    "should",
    "may",
    "might",
    "must",
    "not",
    "no",
    "yes",
    "this",
    "that",
    "these",
    "those",
    "it",
    "its",
    "they",
    "them",
    "their",
    "we",
    "our",
    "you",
    "your",
    "he",
    "she",
    "his",
    "her",
    "i",
    "my",
    "me",
    "who",
    "what",
    "when",
    "where",
    "why",
    "how",
    "which",
    "all",
    "some",
    "many",
    "more",
    "most",
    "few",
    "each",
    "every",
    "other",
    "new",
    "old",
    "good",
    "great",
    "small",
    "large",
    "long",
    "short",
    "high",
    "low",
    "early",
    "late",
    "fast",
    "slow",
    "first",
    "last",
    "next",
    "same",
    "different",
    "important",
    "simple",
    "clear",
    "open",
    "real",
    "time",
    "day",
    "year",
    "way",
    "world",
    "life",
    "work",
    "system",
    "model",
    "data",
    "request",
    "answer",
    "question",
    "server",
    "network",
    "user",
    "people",
    "group",
    "place",
    "city",
    "home",
    "water",
    "light",
    "music",
    "book",
    "story",
    "idea",
    "result",
    "problem",
    "reason",
    "part",
    "number",
    "point",
    "level",
    "order",
    "change",
    "value",
    "language",
    "word",
    "token",
    "batch",
    "cache",
    "route",
    "queue",
    "node",
    "mesh",
    "signal",
    "memory",
    "power",
    "energy",
    "river",
    "mountain",
    "forest",
    "garden",
    "window",
    "road",
    "bridge",
    "market",
    "school",
    "team",
    "friend",
    "family",
    "morning",
    "evening",
    "night",
    "summer",
    "winter",
    "make",
    "take",
    "give",
    "find",
    "know",
    "think",
    "see",
    "look",
    "use",
    "say",
    "tell",
    "ask",
    "help",
    "try",
    "keep",
    "start",
    "run",
    "move",
    "build",
    "learn",
    "read",
    "write",
    "send",
    "serve",
    "wait",
    "grow",
    "turn",
    "follow",
    "bring",
    "hold",
    "show",
    "very",
    "also",
    "then",
    "now",
    "here",
    "there",
    "again",
    "always",
    "never",
    "often",
    "together",
    "quickly",
    "quietly",
    "well",
)

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
FIRST_WORD_ID = 3
VOCAB_SIZE = 256
HASH_BUCKETS = VOCAB_SIZE - FIRST_WORD_ID - len(WORDS)  # Ids for words not in WORDS.
assert HASH_BUCKETS > 0, "word list too long for the vocabulary"

D_MODEL = 64
N_HEADS = 4
N_LAYERS = 2
D_FF = 4 * D_MODEL
MAX_TOKENS_CAP = 256  # Longest completion a request may ask for.
PROMPT_WINDOW = 256  # The model sees only the last PROMPT_WINDOW prompt tokens.
MAX_POSITIONS = 1 + PROMPT_WINDOW + MAX_TOKENS_CAP  # BOS + prompt + completion.
WEIGHT_SEED = 1234

# End-of-sequence shaping: a random model would rarely or always pick EOS; a bias that grows
# with the step count gives a realistic mix of "stop" and "length" finishes.
EOS_BIAS_START = -6.0
EOS_BIAS_PER_STEP = 1.0
PRESENCE_PENALTY = 3.0  # Discourages repeating a word, so completions do not loop.
NEG_INF = np.float32(-1e9)  # Finite so fully masked rows stay NaN-free; exp() gives exact 0.

_TOKEN_RE = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")
_WORD_TO_ID = {w: FIRST_WORD_ID + i for i, w in enumerate(WORDS)}


def split(text: str) -> list[str]:
    """The pieces `tokenize` gives one id each: lower-cased words and punctuation marks.

    Public so that echo_lm echoes exactly the tokens this tokenizer counts.
    """
    return _TOKEN_RE.findall(text.lower())


def tokenize(text: str) -> list[int]:
    """Split text into word/punctuation tokens; unknown words land in stable hash buckets.

    crc32 (not Python's salted hash) keeps ids identical across processes and restarts.
    """
    ids: list[int] = []
    for piece in split(text):
        token_id = _WORD_TO_ID.get(piece)
        if token_id is None:
            bucket = zlib.crc32(piece.encode("utf-8")) % HASH_BUCKETS
            token_id = FIRST_WORD_ID + len(WORDS) + bucket
        ids.append(token_id)
    return ids


def piece_text(piece: str, first: bool) -> str:
    """The text one token piece adds to a completion: after a space unless it is the first
    one or punctuation (which attaches to the preceding word)."""
    if first or piece in {".", ","}:
        return piece
    return " " + piece


def token_text(token_id: int, first: bool) -> str:
    """The text one generated id adds to a completion: its word, spaced by `piece_text`.

    Streaming sends exactly these pieces, so a streamed completion concatenates to the same
    text `detokenize` gives for the whole completion.
    """
    return piece_text(WORDS[token_id - FIRST_WORD_ID], first)


def detokenize(ids: list[int]) -> str:
    """Join generated word ids into text, attaching punctuation to the preceding word."""
    return "".join(token_text(token_id, index == 0) for index, token_id in enumerate(ids))


@dataclass(frozen=True)
class Step:
    """Every row of a batch after one decoding step: what streaming sends, step by step.

    `generated` holds each row's completion token ids so far; `finish` is "" while a row is
    still decoding and "stop" (end-of-sequence) or "length" (MAX_TOKENS reached) once it is
    done. A finished row's entries no longer change.
    """

    prompt_tokens: tuple[int, ...]
    generated: tuple[tuple[int, ...], ...]
    finish: tuple[str, ...]


@dataclass(frozen=True)
class Completion:
    """One generated row: what the caller asked for is echoed back as honest counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _layer_norm(x: np.ndarray) -> np.ndarray:
    """Parameter-free layer norm; learned gains add nothing for random weights."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5)


def _softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class TinyLM:
    """A 2-layer, 4-head causal transformer with seeded weights and a KV cache.

    Every decode step runs the whole batch through the same matrix products, which is what
    makes batching pay off (per-step Python and BLAS overhead is shared across rows).
    """

    def __init__(self, seed: int = WEIGHT_SEED) -> None:
        rng = np.random.default_rng(seed)

        def init(*shape: int, std: float) -> np.ndarray:
            return (rng.standard_normal(shape) * std).astype(np.float32)

        self.tok_emb = init(VOCAB_SIZE, D_MODEL, std=1.0)
        self.pos_emb = init(MAX_POSITIONS, D_MODEL, std=0.5)
        self.layers: list[dict[str, np.ndarray]] = []
        for _ in range(N_LAYERS):
            self.layers.append(
                {
                    "w_qkv": init(D_MODEL, 3 * D_MODEL, std=D_MODEL**-0.5),
                    "w_o": init(D_MODEL, D_MODEL, std=D_MODEL**-0.5),
                    "w_1": init(D_MODEL, D_FF, std=D_MODEL**-0.5),
                    "w_2": init(D_FF, D_MODEL, std=D_FF**-0.5),
                }
            )
        self.w_out = init(D_MODEL, VOCAB_SIZE, std=0.4)
        # Only word ids (and EOS) may be generated: PAD, BOS and hash buckets never appear.
        self.vocab_bias = np.full(VOCAB_SIZE, NEG_INF, dtype=np.float32)
        self.vocab_bias[FIRST_WORD_ID : FIRST_WORD_ID + len(WORDS)] = 0.0
        self.vocab_bias[EOS_ID] = 0.0

    def _attend(
        self,
        layer: dict[str, np.ndarray],
        x: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        start: int,
        key_mask: np.ndarray,
    ) -> np.ndarray:
        """Run one transformer block on x (B, T, D) whose tokens sit at cache slots start..

        key_mask is (B, 1, T, S) additive, with S = start + T visible cache slots.
        """
        batch, steps, _ = x.shape
        head_dim = D_MODEL // N_HEADS
        qkv = _layer_norm(x) @ layer["w_qkv"]
        qkv = qkv.reshape(batch, steps, 3, N_HEADS, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        end = start + steps
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        scores = q @ k_cache[:, :, :end].transpose(0, 1, 3, 2) * np.float32(head_dim**-0.5)
        attn = _softmax(scores + key_mask)
        mixed = (attn @ v_cache[:, :, :end]).transpose(0, 2, 1, 3).reshape(batch, steps, D_MODEL)
        x = x + mixed @ layer["w_o"]
        hidden = np.maximum(_layer_norm(x) @ layer["w_1"], 0.0)
        return x + hidden @ layer["w_2"]

    def generate(
        self,
        prompts: list[str],
        max_tokens: list[int],
        temperatures: list[float],
        seeds: list[int | None],
        ignore_eos: bool = False,
    ) -> list[Completion]:
        """Complete every prompt in one batched pass: `stream` run to its end.

        Sharing the decoding loop with the streaming model is what guarantees that a streamed
        row concatenates to exactly the text returned here.
        """
        if not prompts:
            return []
        last: Step | None = None
        for step in self.stream(prompts, max_tokens, temperatures, seeds, ignore_eos):
            last = step
        assert last is not None  # stream always yields at least once
        return [
            Completion(
                text=detokenize(list(last.generated[row])),
                prompt_tokens=last.prompt_tokens[row],
                completion_tokens=len(last.generated[row]),
                finish_reason=last.finish[row] or "length",
            )
            for row in range(len(prompts))
        ]

    def stream(
        self,
        prompts: list[str],
        max_tokens: list[int],
        temperatures: list[float],
        seeds: list[int | None],
        ignore_eos: bool = False,
    ) -> Iterator[Step]:
        """Decode every prompt in one batched pass, yielding the batch's state after each step.

        Left padding aligns every row's last prompt token, so one decode step serves all
        rows; padded slots are masked out, which keeps a row's output identical whether it
        runs alone or inside a batch.

        With `ignore_eos` every row generates exactly its MAX_TOKENS (vLLM's option of the
        same name): load tests use it to make each request cost a known amount of work.

        A Step is yielded after the tokens of a step are chosen and before the next forward
        pass, so a caller that stops iterating (a cancelled stream) stops the work at once.
        Rows asking for 0 tokens are finished ("length") from the first Step; when no row
        asks for any, exactly one Step is yielded.
        """
        batch = len(prompts)
        if batch == 0:
            return
        token_lists = [tokenize(p) for p in prompts]
        prompt_counts = tuple(len(ids) for ids in token_lists)
        windows = [[BOS_ID, *ids[-PROMPT_WINDOW:]] for ids in token_lists]
        limits = np.array([min(max(int(m), 0), MAX_TOKENS_CAP) for m in max_tokens])
        prompt_len = max(len(w) for w in windows)
        max_new = int(limits.max())
        total = prompt_len + max_new
        generated: list[list[int]] = [[] for _ in range(batch)]
        finish = ["" if limit > 0 else "length" for limit in limits]

        def state() -> Step:
            return Step(prompt_counts, tuple(tuple(g) for g in generated), tuple(finish))

        if max_new == 0:
            yield state()
            return

        tokens = np.full((batch, prompt_len), PAD_ID, dtype=np.int64)
        pad = np.zeros(batch, dtype=np.int64)
        for row, window in enumerate(windows):
            pad[row] = prompt_len - len(window)
            tokens[row, pad[row] :] = window
        # Slot s of row b holds position s - pad[b]; pad slots are never attended to.
        slots = np.arange(total)
        valid = slots[None, :] >= pad[:, None]  # (B, total)
        positions = np.clip(slots[None, :] - pad[:, None], 0, None)

        head_dim = D_MODEL // N_HEADS
        caches = [
            (
                np.zeros((batch, N_HEADS, total, head_dim), dtype=np.float32),
                np.zeros((batch, N_HEADS, total, head_dim), dtype=np.float32),
            )
            for _ in range(N_LAYERS)
        ]

        # Prefill: causal attention over the padded prompt block.
        causal = slots[None, :prompt_len] <= slots[:prompt_len, None]  # (T, T)
        allowed = causal[None, :, :] & valid[:, None, :prompt_len]
        mask = np.where(allowed, np.float32(0.0), NEG_INF)[:, None, :, :].astype(np.float32)
        x = self.tok_emb[tokens] + self.pos_emb[positions[:, :prompt_len]]
        for layer, (k_cache, v_cache) in zip(self.layers, caches, strict=True):
            x = self._attend(layer, x, k_cache, v_cache, 0, mask)
        last = x[:, -1, :]

        rngs = [
            np.random.default_rng(seed if seed is not None else None) if t > 0 else None
            for t, seed in zip(temperatures, seeds, strict=True)
        ]
        active = limits > 0
        seen = np.zeros((batch, VOCAB_SIZE), dtype=bool)
        for step in range(max_new):
            if not active.any():
                break
            logits = _layer_norm(last) @ self.w_out + self.vocab_bias
            logits -= PRESENCE_PENALTY * seen
            # At least one word per completion; after that EOS grows more likely.
            eos_bias = (
                NEG_INF if step == 0 or ignore_eos else EOS_BIAS_START + EOS_BIAS_PER_STEP * step
            )
            logits[:, EOS_ID] += eos_bias
            next_ids = logits.argmax(axis=-1)
            for row in np.flatnonzero(active):
                rng = rngs[row]
                if rng is not None:
                    probs = _softmax(logits[row].astype(np.float64) / temperatures[row])
                    cdf = np.cumsum(probs)
                    next_ids[row] = min(int(np.searchsorted(cdf, rng.random() * cdf[-1])), 255)
                token_id = int(next_ids[row])
                if token_id == EOS_ID:
                    finish[row] = "stop"
                    active[row] = False
                    continue
                generated[row].append(token_id)
                seen[row, token_id] = True
                if len(generated[row]) >= limits[row]:
                    finish[row] = "length"
                    active[row] = False
            yield state()
            if not active.any() or step == max_new - 1:
                break
            slot = prompt_len + step
            step_mask = np.where(valid[:, None, None, : slot + 1], np.float32(0.0), NEG_INF)
            x = (self.tok_emb[next_ids] + self.pos_emb[positions[:, slot]])[:, None, :]
            for layer, (k_cache, v_cache) in zip(self.layers, caches, strict=True):
                x = self._attend(layer, x, k_cache, v_cache, slot, step_mask)
            last = x[:, 0, :]


def _optional_column(request: Any, name: str, rows: int) -> np.ndarray | None:
    """Read an optional (rows, 1) input, or None when the client left it out."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.shape[0] != rows:
        raise ValueError(f"{name} has {values.shape[0]} rows but PROMPT has {rows}")
    return values


@dataclass
class _Rows:
    """The rows of every request of one execution, concatenated, and where each request's are.

    `spans[i]` is request i's (start, end) slice of the rows, or the TritonError it gets for
    a malformed request (which then runs no rows and fails alone).
    """

    prompts: list[str]
    max_tokens: list[int]
    temperatures: list[float]
    seeds: list[int | None]
    spans: list[tuple[int, int] | Any]


def _read_rows(requests: list[Any], model: str = "tiny_lm") -> _Rows:
    """Concatenate the rows of all requests; a malformed request gets its own error, which
    names `model` (echo_lm reads its rows with this too)."""
    rows = _Rows([], [], [], [], [])
    for request in requests:
        try:
            raw = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)
            count = raw.shape[0]
            limit = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
            limit_values = limit.as_numpy().reshape(-1)
            if limit_values.shape[0] != count:
                raise ValueError(f"MAX_TOKENS has {limit_values.shape[0]} rows, PROMPT {count}")
            temps = _optional_column(request, "TEMPERATURE", count)
            seed_values = _optional_column(request, "SEED", count)
            row_prompts = [
                (v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v))
                for v in raw
            ]
            row_temps = [0.0] * count if temps is None else [float(t) for t in temps]
            if any(not np.isfinite(t) or t < 0 for t in row_temps):
                raise ValueError("TEMPERATURE must be a finite number >= 0")
            row_seeds: list[int | None] = (
                [None] * count
                if seed_values is None
                else [int(s) & 0xFFFFFFFFFFFFFFFF for s in seed_values]
            )
        except Exception as exc:  # Reported to that client, not swallowed.
            rows.spans.append(pb_utils.TritonError(f"{model}: bad request: {exc}"))
            continue
        start = len(rows.prompts)
        rows.prompts.extend(row_prompts)
        rows.max_tokens.extend(int(m) for m in limit_values)
        rows.temperatures.extend(row_temps)
        rows.seeds.extend(row_seeds)
        rows.spans.append((start, len(rows.prompts)))
    return rows


def _response(
    texts: list[str], prompt_tokens: list[int], completion_tokens: list[int], finish: list[str]
) -> Any:
    """One response with the four [rows, 1] output tensors both modes share."""
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor(
                "TEXT", np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
            ),
            pb_utils.Tensor(
                "PROMPT_TOKENS", np.array([[n] for n in prompt_tokens], dtype=np.int32)
            ),
            pb_utils.Tensor(
                "COMPLETION_TOKENS", np.array([[n] for n in completion_tokens], dtype=np.int32)
            ),
            pb_utils.Tensor(
                "FINISH_REASON", np.array([[f.encode("utf-8")] for f in finish], dtype=np.object_)
            ),
        ]
    )


class TritonPythonModel:
    """Triton adapter: concatenates all rows of all requests, runs TinyLM once, splits back.

    The same file serves two models. With `model_transaction_policy { decoupled: true }` in
    its config (tiny_lm_stream) it streams: one response per decoding step for each request;
    otherwise (tiny_lm) one response per request with the whole completion. Sharing the code
    and the seeded weights is what makes a streamed row equal the non-streamed one.
    """

    def initialize(self, args: dict[str, str]) -> None:
        """Build the seeded model once per instance, so every execution reuses the weights."""
        self.model_config = json.loads(args["model_config"])
        self.lm = TinyLM(WEIGHT_SEED)
        # config.pbtxt: parameters { key: "ignore_eos" value: { string_value: "true" } }
        parameter = self.model_config.get("parameters", {}).get("ignore_eos", {})
        self.ignore_eos = parameter.get("string_value", "").lower() == "true"
        # parameters { key: "step_delay_ms" ... }: a slower model, each decoding step that
        # much longer, so tests can act between streamed steps (cancel mid-stream, let a
        # deadline pass) or while a request runs; 0 by default.
        delay = self.model_config.get("parameters", {}).get("step_delay_ms", {})
        self.step_delay_s = float(delay.get("string_value", "0") or 0) / 1000
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.model_config)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        """Serve a list of requests in one batched decoding pass.

        Triton's dynamic batcher hands the Python backend a list of requests rather than a
        merged tensor, so merging them here is what turns queueing into real batch work.
        A malformed request gets its own error response without failing its neighbours.
        """
        rows = _read_rows(requests)
        if self.decoupled:
            self._stream(requests, rows)
            return None
        completions = self.lm.generate(
            rows.prompts, rows.max_tokens, rows.temperatures, rows.seeds, self.ignore_eos
        )
        if self.step_delay_s:
            time.sleep(
                self.step_delay_s * max((c.completion_tokens for c in completions), default=0)
            )
        responses = []
        for span in rows.spans:
            if not isinstance(span, tuple):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=span))
                continue
            part = completions[span[0] : span[1]]
            responses.append(
                _response(
                    [c.text for c in part],
                    [c.prompt_tokens for c in part],
                    [c.completion_tokens for c in part],
                    [c.finish_reason for c in part],
                )
            )
        return responses

    def _stream(self, requests: list[Any], rows: _Rows) -> None:
        """Send each request one response per decoding step until its rows are done.

        A response carries every row of its request: the text that step added (empty for a
        row that added none, or has finished), the cumulative PROMPT_TOKENS and
        COMPLETION_TOKENS, and FINISH_REASON ("" until the row finishes, then "stop" or
        "length", repeated in later responses). The step that finishes a request's last row
        is sent with TRITONSERVER_RESPONSE_COMPLETE_FINAL.

        Cancellation: before sending a step, each request's response sender is asked whether
        the client cancelled. A cancelled request gets only the final flag (Triton still
        needs it) and no more responses; when no request is left, decoding stops, because
        closing the step generator skips every remaining forward pass.
        """
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [request.get_response_sender() for request in requests]
        live: dict[int, tuple[int, int]] = {}
        for index, span in enumerate(rows.spans):
            if isinstance(span, tuple):
                live[index] = span
            else:
                senders[index].send(
                    pb_utils.InferenceResponse(output_tensors=[], error=span), flags=final
                )
        if not live:
            return
        steps = self.lm.stream(
            rows.prompts, rows.max_tokens, rows.temperatures, rows.seeds, self.ignore_eos
        )
        sent = [0] * len(rows.prompts)  # tokens of each row already sent
        try:
            for step in steps:
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
                pieces = []
                for row, ids in enumerate(step.generated):
                    pieces.append(
                        "".join(token_text(ids[k], k == 0) for k in range(sent[row], len(ids)))
                    )
                    sent[row] = len(ids)
                for index, (start, end) in list(live.items()):
                    sender = senders[index]
                    if sender.is_cancelled():
                        del live[index]
                        sender.send(flags=final)
                        continue
                    done = all(step.finish[start:end])
                    sender.send(
                        _response(
                            pieces[start:end],
                            list(step.prompt_tokens[start:end]),
                            [len(ids) for ids in step.generated[start:end]],
                            list(step.finish[start:end]),
                        ),
                        flags=final if done else 0,
                    )
                    if done:
                        del live[index]
                if not live:
                    break
        except Exception as exc:  # A failed step ends every request still streaming.
            error = pb_utils.TritonError(f"tiny_lm: decoding failed: {exc}")
            for index in live:
                senders[index].send(
                    pb_utils.InferenceResponse(output_tensors=[], error=error), flags=final
                )
            live.clear()
        finally:
            steps.close()
            for index in live:  # Only if decoding ended without finishing a request's rows.
                senders[index].send(flags=final)

    def finalize(self) -> None:
        """Nothing to release: the weights are plain numpy arrays."""
