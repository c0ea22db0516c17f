"""``gguf-experts prune``: plans, routing semantics and the streamed cut (cut.py); the --dry-run numbers
(dry_run.py). A pruned model's expert-id map is GGUF metadata: gguf/expert_ids.py."""
