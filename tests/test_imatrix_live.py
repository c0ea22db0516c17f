"""llama.cpp's own llama-imatrix against our capture of the same tokens: `stats imatrix.gguf --model M` equals
`stats` of the trace. llama-imatrix cuts the tokenized text into chunks of n_ctx tokens, puts BOS at each
chunk's first position, clears the KV cache per chunk and requests every output (so the last layer routes
every token); the capture below does exactly that, through llama-cpp-python (the same llama.cpp)."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pandas as pd

import pytest

from gguf_experts.demo import tinymodel

pytestmark = pytest.mark.live  # runs llama-imatrix and llama-cpp-python
ROOT = Path(__file__).resolve().parents[1]
N_CTX, N_CHUNKS = 64, 3
TEXT = ("def add(a, b):\n    return a + b\n\nQ: What is 12 * 7? A: 84. Once upon a time, a small robot "
        "learned to count experts. The quick brown fox jumps over the lazy dog. x = [i * i for i in range(10)]\n"
        "SELECT name FROM users WHERE id = 42; -- the answer\n") * 2


@pytest.mark.parametrize("which", ["random", "trained"])
def test_stats_of_llama_imatrix_equals_stats_of_our_capture(run_cli, llama_bin, tmp_path, which):
    """Both models: the random one (byte vocabulary that adds BOS: the BOS-per-chunk path) and the bundled trained
    one (BPE, no BOS: real, skewed routing that training produced)."""
    from gguf_experts.demo.flow import TRAINED_MODEL
    from gguf_experts.gguf.fingerprint import fingerprint
    from gguf_experts.gguf.reader import open_model
    from gguf_experts.trace.writer import TraceWriter
    from gguf_experts.trace.live.llama import TracedLlama
    from gguf_experts.trace.format import PHASE_PREFILL

    add_bos = which == "random"
    model = tinymodel.make_tiny_model(tmp_path / "tiny.gguf", seed=7, add_bos=True) if add_bos else TRAINED_MODEL
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT if add_bos else TEXT * 3)  # BPE: about 3.5 bytes a token, so more text for 3 chunks
    imat = tmp_path / "imatrix.gguf"
    r = subprocess.run([str(llama_bin / "llama-imatrix"), "-m", str(model), "-f", str(text), "-c", str(N_CTX),
                        "-b", str(N_CTX), "--chunks", str(N_CHUNKS), "-t", "2", "-o", str(imat), "--no-ppl"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and imat.exists(), r.stderr[-3000:]

    fp = fingerprint(open_model(model))
    trace = tmp_path / "same.bin"
    with TraceWriter(trace, fp) as sink, TracedLlama(model, sink, fp, n_ctx=N_CTX, n_ubatch=N_CTX,
                                                       n_threads=2) as tl:
        tokens = tl.tokenize(text.read_text(), add_special=True)
        bos = int(tl.lc.llama_vocab_bos(tl.vocab))
        assert (tokens[0] == bos) == add_bos and len(tokens) >= N_CTX * N_CHUNKS  # the vocabulary adds BOS or not
        for c in range(N_CHUNKS):
            chunk = tokens[c * N_CTX:(c + 1) * N_CTX]
            if add_bos:
                chunk[0] = bos  # llama-imatrix: BOS at every chunk's first position (add_bos vocabularies)
            tl.new_sequence()
            tl.eval(chunk, phase=PHASE_PREFILL, logits="all")

    def stats(path: Path) -> pd.DataFrame:
        out = run_cli("stats", path, "--model", model, "-f", "csv")
        assert out.rc == 0, out.err
        return pd.read_csv(io.StringIO(out.out)).sort_values(["layer", "expert"], ignore_index=True)

    ours, theirs = stats(trace), stats(imat)
    assert ours["activations"].sum() == N_CTX * N_CHUNKS * fp.n_layer * fp.n_expert_used
    pd.testing.assert_frame_equal(ours, theirs)
    layers = run_cli("stats", imat, "--model", model, "--by", "layer", "-f", "csv")
    lf = pd.read_csv(io.StringIO(layers.out))
    assert (lf["tokens"] == N_CTX * N_CHUNKS).all() and (lf["tokens_decode"] == 0).all()
