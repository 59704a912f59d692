"""Questions and records: reading question datasets, resumable JSONL collections, micro-batch planning."""
