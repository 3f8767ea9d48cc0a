"""The evaluation layer every stage and `ftl eval` share: LM loss/perplexity, generations, classification."""
