"""Routing traces: the file format (format.py), writing (writer.py), reading (reader.py), a header the C tracer
left pending (pending.py); live capture through llama-cpp-python (live/) and the LD_PRELOAD tracer of
``gguf-experts run`` (preload/). Import names from their modules: this package re-exports nothing."""
