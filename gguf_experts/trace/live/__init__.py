"""Live capture inside Python through llama-cpp-python's eval callback: capture.py (Recorder, capture), the
llama driver (llama.py), the graph probe (probe.py), ctypes glue (ggml_ctypes.py), prompt inputs (prompts.py)."""
