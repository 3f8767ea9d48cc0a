"""Shared evaluation pieces with hand-computed expectations."""

import math

import pytest

from ftl.config.schema import WandbConfig
from ftl.evaluate.classification import classification_metrics
from ftl.evaluate.report import render_table
from ftl.track.secrets import redact_argv
from ftl.track.wandb_run import choose_mode


def test_classification_metrics_match_hand_computation():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 1, 0, 1, 1, 1]
    m = classification_metrics(labels, preds, names=["neg", "pos", "neutral"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: P=1, R=2/3 ; class 1: P=2/4, R=1 ; class 2: P=0, R=0
    assert m["precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * 0.5 * 1 / 1.5, 0.0]
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert m["classes"] == ["neg", "pos", "neutral"]


def test_report_table_puts_phases_side_by_side():
    text = render_table({"before": {"loss": 2.0, "perplexity": math.exp(2.0),
                                    "samples": [{"prompt": "p", "reference": "r", "generation": "x"}]},
                         "after": {"loss": 1.5, "perplexity": math.exp(1.5),
                                   "samples": [{"prompt": "p", "reference": "r", "generation": "y"}]}})
    assert "| loss | 2.0000 | 1.5000 |" in text
    assert "- before: x" in text and "- after: y" in text and "- reference: r" in text


def test_wandb_goes_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert choose_mode(WandbConfig(enabled=True)) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert choose_mode(WandbConfig(enabled=True)) == "online"
    assert choose_mode(WandbConfig(enabled=True, mode="offline")) == "offline"


def test_secret_arguments_are_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abcdef123456")
    argv = ["ftl", "run", "r.yaml", "--hf-token", "hf_xyz", "--api-key=zzz", "note=abcdef123456"]
    assert redact_argv(argv) == ["ftl", "run", "r.yaml", "--hf-token", "***", "--api-key=***", "note=***"]
