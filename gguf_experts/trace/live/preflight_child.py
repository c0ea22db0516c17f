"""The preflight's child process (run as ``python -m``, never imported): a tiny Q8_0 model, loaded and run.

Kept apart from preflight.py so that the tiny-model writer (which quantizes through llama.cpp, and so is itself
preflighted) is never imported by the preflight: no import circle.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _child(model: str) -> int:
    """In the child: a tiny Q8_0 model (llama.cpp's own quantizer), loaded and run for a few tokens."""
    from ...demo.tinymodel import make_tiny_model
    from .ggml_ctypes import load_llama_cpp

    path = Path(model)
    if not path.exists():
        make_tiny_model(path, quant="Q8_0")
    lc = load_llama_cpp()
    mparams = lc.llama_model_default_params()
    m = lc.llama_model_load_from_file(str(path).encode(), mparams)
    if not m:
        return 1
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 64, 16, 16
    ctx = lc.llama_init_from_model(m, cparams)
    if not ctx:
        return 1
    toks = (lc.llama_token * 8)(*range(3, 11))
    rc = lc.llama_decode(ctx, lc.llama_batch_get_one(toks, 8))
    lc.llama_free(ctx)
    lc.llama_model_free(m)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
