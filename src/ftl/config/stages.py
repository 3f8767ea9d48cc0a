"""The stage table: every recipe stage, the function that runs it, the data it trains on.

One row per stage. The run function is named "module:function" and imported only when the stage runs,
so loading or checking a recipe never imports torch. The schema validates a recipe's stage against
its row (data format, required sections); a test ties the schema's stage names to this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

LM_FORMATS = ("text", "chat", "prompt_completion")
PROMPT_FORMATS = ("prompts", "chat", "prompt_completion")


@dataclass(frozen=True)
class StageInfo:
    run: str                    # "module:function": run(recipe, run_dir, resume=False) -> summary dict
    formats: tuple[str, ...]    # data.format values it trains on
    own_loop: bool              # trains in its own loop or a TRL trainer, not ftl.train.loop.fit
    needs_reward: bool = False  # needs a `reward:` section (a reward model or function)
    packs: bool = False         # trains on packed rows when data.packing and the method allow it
    describe_formats: str = ""  # how an error names the formats (default: the list)
    policy: bool = False        # trains a policy compared with its start on held-out prompts (reward, win rate)

    def run_function(self) -> Callable:
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


STAGES: dict[str, StageInfo] = {
    "sft": StageInfo("ftl.stages.sft:run_sft", LM_FORMATS, own_loop=False, packs=True),
    "reward": StageInfo("ftl.stages.reward:run_reward", ("preference",), own_loop=False,
                        describe_formats="'preference' (prompt, chosen, rejected)"),
    "ppo": StageInfo("ftl.stages.ppo:run_ppo", PROMPT_FORMATS + ("preference",), own_loop=True, needs_reward=True,
                     policy=True),
    "dpo": StageInfo("ftl.stages.dpo:run_dpo", ("preference",), own_loop=True,
                     describe_formats="'preference' (prompt, chosen, rejected)", policy=True),
    "grpo": StageInfo("ftl.stages.grpo:run_grpo", PROMPT_FORMATS + ("preference",), own_loop=True, needs_reward=True,
                      policy=True),
    "classify": StageInfo("ftl.stages.classify:run_classify", ("classification",), own_loop=False,
                          describe_formats="'classification' (text, label)"),
    "upft": StageInfo("ftl.stages.upft:run_upft", PROMPT_FORMATS, own_loop=False, packs=True,
                      describe_formats="unlabelled prompts: prompts, chat or prompt_completion"),
}


def stage_problems(stage: str, data_format: str | None, has_reward: bool, kind: str | None = None) -> list[str]:
    """What a recipe lacks for its stage (empty when it has everything). data_format None: not known yet
    (data.format auto); kind: the records it gives when the format's name says otherwise (alpaca → prompt_completion)."""
    info = STAGES[stage]
    problems = []
    if info.needs_reward and not has_reward:
        problems.append(f"stage '{stage}' needs a 'reward' section (reward.kind model with reward.path, or "
                        "function with reward.function)")
    kind = kind or data_format
    if data_format is not None and kind not in info.formats:
        formats = info.describe_formats or ", ".join(info.formats)
        gives = f" ({kind} records)" if kind != data_format else ""
        problems.append(f"stage '{stage}' trains on data.format {formats}, not '{data_format}'{gives}")
    return problems
