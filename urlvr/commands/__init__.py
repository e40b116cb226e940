"""Commands that orchestrate whole runs on top of the trainer: `urlvr mcs`, `urlvr sweep`."""
