"""Pure building blocks shared by every phase: prompts and control phrases, sequence surgery, losses, model
loading and export, the optimizer, sharding, the sample-budget ledger and tiny local models for tests."""
