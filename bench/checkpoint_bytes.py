"""Bytes per checkpoint per method on SmolLM2-135M-Instruct (the `small` profile's model, fp32).

Each method trains one optimizer step through ftl's loop (`fit`, AdamW) and checkpoints it; the result is
the size of `checkpoints/step-0000001` and of each file in it. Adapter methods store their trained tensors,
optimizer, scheduler and RNG states; full fine-tuning stores the whole model and its optimizer state.

    python bench/run.py checkpoint_bytes          # with the other benchmarks' table
    python bench/checkpoint_bytes.py OUT.json     # alone (e.g. against another checkout's src/)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # recipes/sft_chat.yaml
METHODS = {  # label → (method.kind, options); "classify head-only" is a 4-way head on the frozen model
    "full": ("full", {}), "lora": ("lora", {"lora": LORA}), "qlora": ("qlora", {"lora": LORA}),
    "dora": ("dora", {"lora": LORA}), "ia3": ("ia3", {}), "prefix": ("prefix", {}), "prompt": ("prompt", {}),
    "adapter": ("adapter", {}), "classify head-only": ("full", {}),
}
TOKENS, LABELS = 64, 4


def build(label: str):
    from ftl.config.schema import MethodConfig, ModelConfig
    from ftl.methods import METHODS as METHOD_TABLE, apply_method
    from ftl.models.load import load_model, pretrained_dir

    kind, options = METHODS[label]
    method = MethodConfig.model_validate({"kind": kind, **options})
    cfg = ModelConfig(source="smollm2", dtype="float32")
    if label == "classify head-only":  # what classify.train_head_only leaves trainable
        model = load_model(cfg, pretrained_dir(cfg), head="sequence_classification", num_labels=LABELS)
        model.config.pad_token_id = 0
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("score."))
        return model
    return apply_method(load_model(cfg, pretrained_dir(cfg), METHOD_TABLE[kind].quant_bits, method.quant), method)


def loss_for(label: str):
    from ftl.evaluate.lm import causal_lm_loss

    if label != "classify head-only":
        return causal_lm_loss

    def classify_loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"][:, 0] % LABELS), len(logits)
    return classify_loss


def checkpoint_of(label: str, run_dir: Path) -> dict:
    from ftl.config.schema import LaunchConfig, TrainConfig
    from ftl.data.packing import collate
    from ftl.methods import trainable_summary
    from ftl.train.distributed import make_accelerator
    from ftl.train.loop import fit

    torch.manual_seed(0)
    model = build(label)
    ids = torch.randint(1, 49152, (2, TOKENS)).tolist()
    rows = [{"input_ids": row, "labels": row} for row in ids]
    cfg = TrainConfig(lr=1e-4, max_steps=1, batch_size=2, warmup_steps=0, save_every=1)
    started = time.perf_counter()
    fit(accelerator=make_accelerator(cfg, LaunchConfig()), model=model, cfg=cfg, features=rows,
        collate=lambda rs: collate(rs, 0), loss_fn=loss_for(label), run_dir=run_dir, log=lambda r: None,
        progress=False)
    folder = run_dir / "checkpoints" / "step-0000001"
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    return {"bytes": sum(files.values()), "files": files, "seconds": time.perf_counter() - started,
            "trainable_params": trainable_summary(model)["trainable_params"]}


def main() -> dict:
    per_method = {}
    for label in METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            per_method[label] = checkpoint_of(label, Path(tmp))
        print(f"  {label}: {per_method[label]['bytes'] / 1e6:.2f} MB", flush=True)
    return {"name": "checkpoint_bytes", "model": "SmolLM2-135M-Instruct (fp32)", "methods": per_method,
            "lora_share_of_full": per_method["lora"]["bytes"] / per_method["full"]["bytes"]}


if __name__ == "__main__":
    result = main()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=1))
