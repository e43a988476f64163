"""The registry in charlm.model is the one list of cells: a cell added there at runtime, and
nowhere else, is validated, trains, samples and evaluates through the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from charlm import model as model_module
from charlm.config import load_config
from tests.conftest import invoke, sets, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


class Bigram(nn.Module):
    """The smallest model with charlm's contract: logits from the current character only."""

    carries_state = False

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx: torch.Tensor, state=None):
        return self.head(self.embed(idx)), None


def test_a_cell_added_to_the_registry_works_everywhere(tmp_path, corpus, monkeypatch):
    monkeypatch.setitem(model_module.REGISTRY, "bigram",
                        lambda cfg, vocab: Bigram(vocab, cfg.model.hidden_size))
    assert load_config("lstm", ["model.cell=bigram"]).model.cell == "bigram"
    runs = tmp_path / "runs"
    overrides = [o for o in tiny_overrides(corpus, "lstm", 10) if not o.startswith("model.cell")]
    result = invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "b",
                    *sets(overrides + ["model.cell=bigram"]))
    assert result.exit_code == 0, result.stderr
    sample = invoke("sample", "--runs-dir", runs, "--prime", "the", "--length", "5", "--seed", "1")
    assert sample.exit_code == 0 and sample.stdout.startswith("the"), sample.stderr
    assert invoke("eval", "--runs-dir", runs, "--json").exit_code == 0
    monkeypatch.delitem(model_module.REGISTRY, "bigram")
    with pytest.raises(ValueError, match="valid cells: " + ", ".join(model_module.REGISTRY)):
        load_config("lstm", ["model.cell=bigram"])
