"""``gguf-experts demo`` and ``make-model``: the demo flow (flow.py) and tiny random-weight MoE GGUFs that
llama.cpp runs (tinymodel.py)."""
