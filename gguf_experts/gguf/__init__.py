"""GGUF files: the header reader (reader.py), tensor names (names.py), metadata checks (metadata.py), the byte
map (layout.py), model fingerprints (fingerprint.py), byte-map checks (check.py), a pruned model's expert ids
(expert_ids.py), the one encoder (encode.py) and the writers (writer.py for fixtures, stream.py for derived
models)."""
