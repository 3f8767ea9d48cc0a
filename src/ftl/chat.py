"""`ftl chat TARGET`: talk to what a run trained (its final/ model, an adapter on its base) or to a model folder.

Prompts render through the saved tokenizer's chat template with the generation prompt, exactly as training
rendered conversations (a tokenizer without one gets the plain text, as generation_prompt gives it); the
reply stops at EOS or at the template's end of turn. `--prompt` answers once; otherwise a conversation is
read from stdin line by line (a pipe works too): `/reset` forgets it, `/exit` or end of input quits.
Replies go to stdout, everything else to stderr. Imported only by that command, so torch loads at module level.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Optional

import torch

from ftl.console import hide_weight_bars
from ftl.data.chat_templates import end_of_turn
from ftl.data.conversation import render, with_system
from ftl.errors import FtlError
from ftl.evaluate.by_stage import BY_STAGE
from ftl.evaluate.device import eval_device, model_device
from ftl.evaluate.target import open_target
from ftl.evaluate.target_models import load_causal_lm

CHAT_KINDS = ("language_model", "policy")  # BY_STAGE kinds with a language-model head


class Chat:
    """A loaded model and tokenizer, and how to get one reply to a conversation."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 128, temperature: float = 0.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.turn_end = end_of_turn(tokenizer) if tokenizer.chat_template else None
        self.stop_ids = stop_token_ids(model, tokenizer, self.turn_end)
        # a multi-token end of turn (a template writing markers the vocabulary lacks) stops as text
        self.stop_text = self.turn_end if self.turn_end and token_id(tokenizer, self.turn_end) is None else None

    def prompt_text(self, messages: list[dict]) -> str:
        if self.tokenizer.chat_template:
            return render(self.tokenizer, messages, generation=True)
        return "\n".join(m["content"] for m in messages if m["role"] != "system")

    @torch.no_grad()
    def reply(self, messages: list[dict]) -> str:
        tokenizer = self.tokenizer
        ids = tokenizer(self.prompt_text(messages), add_special_tokens=False, return_tensors="pt").input_ids
        ids = ids.to(model_device(self.model))
        sampling = {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0} \
            if self.temperature > 0 else {"do_sample": False}
        stop = {"stop_strings": [self.stop_text], "tokenizer": tokenizer} if self.stop_text else {}
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=self.stop_ids or None, **sampling, **stop)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return (text.split(self.stop_text)[0] if self.stop_text else text).strip()


def token_id(tokenizer, text: str) -> Optional[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def stop_token_ids(model, tokenizer, turn_end: Optional[str]) -> list[int]:
    """EOS, the model's own stop tokens (Llama 3 Instruct lists <|eot_id|> there) and the template's end of
    turn when it is one token."""
    configured = model.generation_config.eos_token_id
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    if turn_end:
        ids.append(token_id(tokenizer, turn_end))
    return sorted({i for i in ids if i is not None})


def open_chat(target: str, max_new_tokens: int = 128, temperature: float = 0.0, device: str = "auto"):
    """(Chat, the run's data.system_prompt or None). Refused before any model loads: a missing target, a
    classifier or reward model."""
    if max_new_tokens < 1:
        raise FtlError(f"--max-new-tokens {max_new_tokens}: expected at least 1")
    if temperature < 0:
        raise FtlError(f"--temperature {temperature}: expected 0 (greedy) or more (sampled)")
    wanted = eval_device(device, torch.cuda.is_available())
    path = Path(target)
    run, stage = open_target(path)
    kind = BY_STAGE[stage].name
    if kind not in CHAT_KINDS:
        what = f"holds a {kind.replace('_', ' ')} (stage '{stage}')" if run else \
            f"is a {kind.replace('_', ' ')} folder (a sequence classifier)"
        raise FtlError(f"{path} {what}: ftl chat talks to language models (stages sft, upft, ppo, dpo, grpo); "
                       f"score it with `ftl eval {path}`")
    hide_weight_bars()  # a conversation on the terminal, not transformers' loading bars
    model, tokenizer = load_causal_lm(path, run is not None, wanted)
    return Chat(model.eval(), tokenizer, max_new_tokens, temperature), run.data.system_prompt if run else None


def run_chat(target: str, prompt: Optional[str] = None, system: Optional[str] = None, max_new_tokens: int = 128,
             temperature: float = 0.0, device: str = "auto", stdin: IO[str] = None, stdout: IO[str] = None) -> None:
    """system None: the run's data.system_prompt; '' for none."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    chat, run_system = open_chat(target, max_new_tokens, temperature, device)
    system = run_system if system is None else system
    if prompt is not None:
        print(chat.reply(with_system([{"role": "user", "content": prompt}], system)), file=stdout, flush=True)
        return
    interactive = stdin.isatty()
    if interactive:
        print("ftl chat: type a message; /reset forgets the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    history: list[dict] = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        message = line.strip()
        if message == "/exit":
            break
        if message == "/reset":
            history = []
            print("ftl chat: conversation reset", file=sys.stderr, flush=True)
            continue
        if message.startswith("/") and " " not in message:  # a mistyped command is not a message
            print(f"ftl chat: unknown command {message} (commands: /reset, /exit)", file=sys.stderr, flush=True)
            continue
        if not message:
            continue
        history.append({"role": "user", "content": message})
        answer = chat.reply(with_system(history, system))
        history.append({"role": "assistant", "content": answer})
        print(answer, file=stdout, flush=True)
