"""charlm: train, sample and evaluate character-level language models.

Hand-written RNN/LSTM/GRU cells (`charlm.cells`, exact twins of torch.nn's) and a causal
Transformer baseline behind one model contract, driven by YAML configs and a Typer CLI.
"""

__version__ = "1.0.0"
