"""Drivers that chain the phases: the embedded demo, the comparison table, the data verifier, the dry run of a
config on the CPU (``dryrun`` with its plan, checks and stand-ins)."""
