"""Chat templates: a conversation (a list of {"role", "content"} messages) rendered into the prompt text a chat
model was trained on, by the model's own jinja2 template, exactly as Hugging Face transformers'
`apply_chat_template` renders it (transformers/utils/chat_template_utils.py): a sandboxed, immutable jinja2
environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, `raise_exception`,
`strftime_now`, a `tojson` filter that does not escape HTML, `dict` and `namespace` without paths to Python's
internals, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables. Templates come with
downloaded models: they are untrusted code, hence the sandbox. Messages are checked here, at the boundary, with
errors that name the bad message and field.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.checks import shown

ROLES_HINT = "e.g. 'system', 'user', 'assistant'"


class ChatTemplateError(ValueError):
    """A conversation that cannot be rendered: bad messages, or the template refused them (`raise_exception`)."""


def messages_problem(messages: Any) -> str | None:
    """Why `messages` is not a conversation (None if it is): a non-empty list of objects, each with a non-empty
    string "role" and a string "content" (other keys are passed to the template as they are)."""
    if not isinstance(messages, (list, tuple)):
        return f"messages must be a list of {{'role': str, 'content': str}} objects, got {shown(messages)}"
    if not messages:
        return "messages is empty: a conversation needs at least one message"
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"messages[{i}] must be an object with 'role' and 'content', got {shown(message)}"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            return f"messages[{i}].role must be a non-empty string ({ROLES_HINT}), got {shown(role)}"
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string, got {shown(content)}"
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters; transformers' does not, and templates are written against it
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in templates, without the class itself (no attribute path to Python internals)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's own signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the attribute {name!r} on a "
                                                  f"namespace (underscore-prefixed)")


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached: a server renders the same one for every request). Raises ChatTemplateError
    if it is not valid jinja2."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid jinja2 (line {e.lineno}: {e.message})") from None


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: Mapping[str, str | None] | None = None, **variables: Any) -> str:
    """The text of `messages` rendered by `template`; with `add_generation_prompt` it ends with the header of an
    assistant turn, so the model's continuation is the reply. `special_tokens` (bos_token, eos_token, unk_token,
    pad_token: their text) and `variables` are visible to the template. Raises ChatTemplateError naming the bad
    message, or with the template's own message when it refuses the conversation."""
    problem = messages_problem(messages)
    if problem is not None:
        raise ChatTemplateError(problem)
    context = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    plain = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]  # transformers drops None values
    try:
        return compile_template(template).render(messages=plain, add_generation_prompt=add_generation_prompt,
                                                 tools=None, documents=None, **context, **variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
