"""The evaluation layer every stage and `ftl eval` share: LM loss/perplexity, generations, classification,
reward-model pairs; `ftl eval` itself (target.py) scores each stage's output by its kind (by_stage.py)."""
