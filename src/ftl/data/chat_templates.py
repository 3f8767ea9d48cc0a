"""Chat templates a recipe sets with `data.chat_template`: a name from CHAT_TEMPLATES, or a Jinja file.

The template replaces the tokenizer's own when the run builds its tokenizer, so it is saved with the
tokenizer (run folder and final/) and every later reader (resume, `ftl eval`, `ftl chat`) renders alike.
Before a run uses one it must render a user + assistant exchange as the prompt-with-generation-prompt
followed by the answer: assistant-only labels are located by exactly that (tokenize.encode_chat), so a
template that drops the answer or rewrites the prompt once answered is refused here, by key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftl.errors import RecipeError

KEY = "data.chat_template"


@dataclass(frozen=True)
class ChatTemplate:
    text: str                        # the Jinja source
    origin: str                      # the name, or the file's path
    markers: tuple[str, ...] = ()    # special tokens it writes: a tiny tokenizer learns each as one token
    end_of_turn: Optional[str] = None  # what closes an assistant turn: a tiny tokenizer's EOS


# one entry per name; the schema's CHAT_TEMPLATE_NAMES lists the same names (a test ties the two)
CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "chatml", ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    # Meta's Llama 3 Instruct template; the begin-of-text marker is written out rather than taken from
    # bos_token, so a tokenizer with another (or no) BOS still renders Llama 3's format. A system message is
    # a turn like any other.
    "llama3": ChatTemplate(
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "llama3", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
}

PROBE_QUESTION, PROBE_ANSWER = "ftl-probe-question", "ftl-probe-answer"


def template_manifest(value: Optional[str], tokenizer) -> Optional[dict]:
    """What the manifest records: data.chat_template as set (or the tokenizer's own) and the sha256 of the
    template text the run's tokenizer holds (a resume's saved one included)."""
    text = tokenizer.chat_template
    if not isinstance(text, str):
        return None
    return {"source": value or "tokenizer", "sha256": hashlib.sha256(text.encode()).hexdigest()}


def load_chat_template(value: str) -> ChatTemplate:
    """data.chat_template (a name, or a path the recipe loader made absolute) → the template, checked."""
    if value in CHAT_TEMPLATES:
        template = CHAT_TEMPLATES[value]
    else:
        path = Path(value)
        names = ", ".join(CHAT_TEMPLATES)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise RecipeError(f"{KEY}: {path} {what}; expected a Jinja template file or a name ({names})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise RecipeError(f"{KEY}: cannot read {path} as UTF-8 text ({err})") from None
        template = ChatTemplate(text, str(path))
    end = check_renders(template)
    if template.end_of_turn is None and end and not any(c.isspace() for c in end):
        template = ChatTemplate(template.text, template.origin, (end,), end)  # e.g. </s>, <|eot_id|>
    return template


def render_template(text: str, messages: list[dict], generation: bool) -> str:
    """The template's text for messages, rendered as tokenizer.apply_chat_template renders it (no tokenizer's
    special tokens: a template that writes bos_token gets nothing there)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=text,
                                        add_generation_prompt=generation)
    return rendered[0]


def check_renders(template: ChatTemplate) -> Optional[str]:
    """Refuse a template that cannot locate assistant-only labels; return what it writes after an answer
    (its end of turn, stripped; None when nothing)."""
    import jinja2

    question = [{"role": "user", "content": PROBE_QUESTION}]
    exchange = question + [{"role": "assistant", "content": PROBE_ANSWER}]
    where = f"{KEY}: {template.origin}"
    try:
        prompt = render_template(template.text, question, generation=True)
        full = render_template(template.text, exchange, generation=False)
    except jinja2.TemplateSyntaxError as err:
        raise RecipeError(f"{where} is not a valid Jinja template (line {err.lineno}: {err.message})") from None
    except Exception as err:  # the template's own raise_exception, a TypeError, an undefined filter, ...
        raise RecipeError(f"{where} fails to render a user + assistant exchange ({type(err).__name__}: {err})") \
            from None
    expected = "expected a template that renders each message's content, and the prompt with " \
               "add_generation_prompt as the beginning of the answered exchange"
    if PROBE_QUESTION not in full or PROBE_ANSWER not in full:
        role = "user's message" if PROBE_QUESTION not in full else "assistant's answer"
        raise RecipeError(f"{where} drops the {role} (the rendered exchange is {full!r}), so the model would "
                          f"train without it; {expected}")
    if not full.startswith(prompt) or PROBE_ANSWER not in full[len(prompt):]:
        raise RecipeError(f"{where} renders the prompt ({prompt!r}) differently once answered ({full!r}), so "
                          f"assistant-only labels cannot be located; {expected}")
    return full[full.index(PROBE_ANSWER) + len(PROBE_ANSWER):].strip() or None


def end_of_turn(tokenizer) -> Optional[str]:
    """What the tokenizer's chat template writes after an assistant's answer (stripped), or None (no template,
    or one that fails the check: stop at EOS alone)."""
    if not isinstance(tokenizer.chat_template, str):
        return None
    try:
        return check_renders(ChatTemplate(tokenizer.chat_template, "the tokenizer's chat template"))
    except RecipeError:
        return None


def untokenized_markers(tokenizer, template: ChatTemplate) -> list[str]:
    """The template's markers the tokenizer has no single token for (they train as plain text)."""
    return [m for m in template.markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]
