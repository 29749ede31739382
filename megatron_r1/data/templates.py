"""Prompt templates, by name: the R1-Zero training template and role-tagged chat.

Notable choices:
- ``r1_zero`` is DeepSeek-R1 paper Table 1 word for word. It ends at "Assistant:"; the model
  writes ``<think>`` itself (pair it with the format reward's default ``prefilled_think=False``).
- ``chat`` renders ``[{"role", "content"}]`` messages with the tokenizer's own
  ``apply_chat_template`` when it has a ``chat_template`` (the tokenizer owns its special
  tokens), else with a plain ``<|role|>`` format so tiny test tokenizers work too.
- ``r1_chat`` is ``chat`` with the instruction DeepSeek recommends for math prompts appended
  to the user turn ("Please reason step by step, and put your final answer within \\boxed{}.").
- Each template names the format-reward variant its outputs follow (``answer_format``):
  ``r1_zero`` asks for ``<answer>`` tags, ``r1_chat`` for a ``\\boxed{}`` answer after the
  thought (``r1_boxed``), ``chat`` only for a thought and a summary (``r1``).
- A plain-string prompt given to a chat template becomes one user message; a message list
  given to ``r1_zero`` is an error (it has one slot for the question).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": ...}
Prompt = Union[str, Sequence[Message]]

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)
R1_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _as_messages(prompt: Prompt) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


@dataclass(frozen=True)
class FormatTemplate:
    """One ``{prompt}`` slot in a fixed string."""

    text: str
    answer_format: str = "r1_zero"  # the format reward's variant for this template's outputs

    def render(self, prompt: Prompt, tokenizer: Any = None) -> str:
        if not isinstance(prompt, str):
            raise TypeError("this template takes a plain-string prompt, not a list of messages")
        # str.format parses only the template, so braces inside the question are safe.
        return self.text.format(prompt=prompt)


@dataclass(frozen=True)
class ChatTemplate:
    """Role-tagged messages; the tokenizer's chat template wins when there is one."""

    message_format: str = "<|{role}|>\n{content}\n"
    generation_prompt: str = "<|assistant|>\n"
    user_suffix: str = ""  # appended to the last user message (e.g. the R1 math instruction)
    answer_format: str = "r1"  # the format reward's variant for this template's outputs

    def render(self, prompt: Prompt, tokenizer: Any = None) -> str:
        messages = _as_messages(prompt)
        if self.user_suffix:
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[last_user]["content"] = f"{messages[last_user]['content']}\n{self.user_suffix}"
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        body = "".join(self.message_format.format(role=m["role"], content=m["content"]) for m in messages)
        return body + self.generation_prompt


_TEMPLATES: dict[str, Any] = {}


def register_template(name: str, template: Any) -> None:
    """Anything with ``render(prompt, tokenizer=None) -> str``."""
    if name in _TEMPLATES:
        raise ValueError(f"template {name!r} is already registered")
    _TEMPLATES[name] = template


def get_template(name: str):
    if name not in _TEMPLATES:
        raise KeyError(f"unknown template {name!r}; registered: {sorted(_TEMPLATES)}")
    return _TEMPLATES[name]


def render_prompt(name: str, prompt: Prompt, tokenizer: Any = None) -> str:
    return get_template(name).render(prompt, tokenizer=tokenizer)


register_template("r1_zero", FormatTemplate(R1_ZERO_TEMPLATE))
register_template("chat", ChatTemplate())
register_template("r1_chat", ChatTemplate(user_suffix=R1_MATH_INSTRUCTION, answer_format="r1_boxed"))
