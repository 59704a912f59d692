"""Drivers that chain the phases: the embedded demo, the comparison table, the data verifier."""
