"""train/chat_template.py against transformers' own renderer (`render_jinja_template`, what apply_chat_template
calls): the same text for SmolLM2's template and for templates that use what the environment provides (bos/eos
variables, raise_exception, tojson, loop controls, namespace, trim/lstrip blocks), with and without the generation
prompt; bad messages named by index and field; a template's refusal and sandbox escapes as ChatTemplateError."""

from __future__ import annotations

import pytest

from train.chat_template import ChatTemplateError, messages_problem, render_chat

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_LIKE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    <|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""
FEATURES = """{% set ns = namespace(count=0) %}
{% for m in messages %}
  {% if m['role'] == 'system' %}{% continue %}{% endif %}
  {% set ns.count = ns.count + 1 %}
  {{ m | tojson }}{{ eos_token }}
  {% if ns.count > 2 %}{% break %}{% endif %}
{% endfor %}
turns={{ ns.count }} {{ dict(a=1) | tojson }} {{ "<&>" | tojson }}{% if add_generation_prompt %}>{% endif %}"""
TEMPLATES = {"smollm2": SMOLLM2, "llama3_like": LLAMA3_LIKE, "features": FEATURES}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello 😀 <b>&</b>"}, {"role": "assistant", "content": "Hi! 中文?\n"},
     {"role": "user", "content": "def f():\n    pass"}, {"role": "assistant", "content": "  ok  "},
     {"role": "user", "content": "\"quoted\""}],
]


def reference(template: str, messages: list, add_generation_prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    special = {k: v for k, v in SPECIAL.items() if v is not None}
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **special)
    return rendered[0]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers_does(name, add_generation_prompt):
    pytest.importorskip("transformers")
    for messages in CONVERSATIONS:
        ours = render_chat(TEMPLATES[name], messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=SPECIAL)
        assert ours == reference(TEMPLATES[name], messages, add_generation_prompt), (name, messages)


def test_pinned_smollm2_prompt():
    text = render_chat(SMOLLM2, [{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, message", [
    ("hi", "messages must be a list of"),
    ([], "messages is empty"),
    ([{"role": "user", "content": "a"}, "b"], "messages[1] must be an object with 'role' and 'content', got 'b'"),
    ([{"content": "a"}], "messages[0].role must be a non-empty string"),
    ([{"role": "", "content": "a"}], "messages[0].role must be a non-empty string"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], "messages[1].content must be a string, got 3"),
    ([{"role": "user"}], "messages[0].content must be a string, got None"),
])
def test_bad_messages_are_named(messages, message):
    assert message in messages_problem(messages)
    with pytest.raises(ChatTemplateError) as e:
        render_chat(SMOLLM2, messages)
    assert message in str(e.value)


def test_template_refusals_and_escapes_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="refused the conversation: unknown role tool"):
        render_chat(LLAMA3_LIKE, [{"role": "tool", "content": "x"}], special_tokens=SPECIAL)
    with pytest.raises(ChatTemplateError, match="refused"):
        render_chat("{{ ''.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="refused"):
        render_chat("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="not valid jinja2"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])
