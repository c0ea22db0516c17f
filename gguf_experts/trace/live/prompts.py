"""Prompt inputs of capture and profile: --prompt, --prompts (one per line) and --jsonl records, read
strictly (see strictio), and the byte bound that refuses a text too long for the context before it is
tokenised (llama_tokenize's cost grows faster than linearly with the text: 200 KB took 53 s)."""
from __future__ import annotations

import os
from typing import Any

from ...errors import InputError
from ...strictio import check_encodable, iter_jsonl, read_text

#: --jsonl: (prompt keys, response keys) tried in order; a record's text is prompt + response
JSONL_PROMPT_KEYS = ("prompt", "instruction", "question", "input", "text")
JSONL_RESPONSE_KEYS = ("response", "output", "completion", "answer")


def jsonl_text(rec: Any, where: str, sep: str = "") -> str:
    """prompt + sep + response of one record (keys: prompt/response, instruction/input/output, text,
    messages); sep is "" for us, "\n" for llama-expert-profile (profile --compat expert-profile)."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("messages"), list):
        text = "\n".join(str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict))
        return check_encodable(text, where)
    prompt = next((str(rec[k]) for k in JSONL_PROMPT_KEYS if isinstance(rec.get(k), str)), None)
    if prompt is None:
        raise InputError(f"{where}: no prompt key; use one of {', '.join(JSONL_PROMPT_KEYS)} "
                         f"(and optionally {', '.join(JSONL_RESPONSE_KEYS)}) or 'messages'")
    if "instruction" in rec and isinstance(rec.get("input"), str) and rec["input"]:
        prompt = f"{prompt}\n{rec['input']}"
    resp = next((str(rec[k]) for k in JSONL_RESPONSE_KEYS if isinstance(rec.get(k), str)), "")
    return check_encodable(prompt + sep + resp, where)


def jsonl_texts(path: str | os.PathLike[str], sep: str = "") -> list[str]:
    """Texts of the non-blank JSONL lines, in order (a record's index is its place among them)."""
    return [jsonl_text(rec, f"{path}:{no}", sep) for no, rec in iter_jsonl(path, "JSONL file of prompt records")]


def prompt_lines(path: str | os.PathLike[str]) -> list[str]:
    """--prompts: one prompt per line (blank lines are dropped by read_prompts)."""
    return read_text(path, "prompt file (one prompt per line)").splitlines()


def read_prompts(prompt: str | None = None, prompts: str | os.PathLike[str] | None = None,
                 jsonl: str | os.PathLike[str] | None = None) -> list[str]:
    """The non-empty prompt texts of whichever source is given."""
    if prompt is not None:
        texts = [check_encodable(prompt, "--prompt")]
    elif prompts is not None:
        texts = prompt_lines(prompts)
    elif jsonl is not None:
        texts = jsonl_texts(jsonl)
    else:
        texts = []
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError("no non-empty prompt given")
    return texts


def cannot_fit(text: str, n_tokens: int, max_token_bytes: int) -> bool:
    """True when ``text`` surely needs more than ``n_tokens`` tokens: the pieces of its tokens concatenate
    to its bytes and none is longer than the vocabulary's longest piece, so tokens >= bytes / longest."""
    return len(text.encode("utf-8")) > n_tokens * max(1, max_token_bytes)


def head_for(text: str, n_tokens: int, max_token_bytes: int) -> str:
    """The part of ``text`` that can hold its first ``n_tokens`` tokens (cut on a character boundary):
    tokenising it gives those tokens without tokenising the rest (profile cuts records to the context)."""
    limit = n_tokens * max(1, max_token_bytes) + 16  # + a margin: merges at the cut may shift a token
    raw = text.encode("utf-8")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")
