"""Chat templates: `tools` reach the template, and the native tool-call format is probed from what renders."""

from __future__ import annotations

from qanat.models.chat_template import PROBE_TOOL, ChatTemplate

# The embedded SmolLM2's template: no tool support.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen 2.5's tool template, abridged (the Hermes format: <tool_call>{"name", "arguments"}</tool_call>).
HERMES = """\
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are Qwen.{% endif %}

# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}{{ "\n" }}{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}<|im_start|>\
{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for tool_call in message.tool_calls %}<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3.1's JSON tool calls, abridged: {"name": ..., "parameters": ...}.
LLAMA3 = """\
{%- for message in messages %}
{%- if message.role == 'user' and tools and loop.first %}<|start_header_id|>user<|end_header_id|>

Given the following functions, respond with a JSON for a function call with its proper arguments.
Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.
{% for t in tools %}{{ t | tojson }}
{% endfor %}{{ message.content }}<|eot_id|>
{%- elif message.role == 'assistant' and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{%- set call = message.tool_calls[0].function %}
{"name": "{{ call.name }}", "parameters": {{ call.arguments | tojson }}}<|eot_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def test_templates_are_probed_for_their_native_tool_call_format() -> None:
    assert ChatTemplate(SMOLLM2, "<|im_start|>", "<|im_end|>").tool_call_format is None
    assert ChatTemplate(HERMES, "", "<|im_end|>").tool_call_format == "hermes"
    assert ChatTemplate(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").tool_call_format == "llama3"
    # Renders tools but not an assistant's calls: not native, so the generic format is used.
    tools_only = "{% for t in tools %}{{ t | tojson }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert ChatTemplate(tools_only, "", "").tool_call_format is None


def test_tools_reach_the_template() -> None:
    template = ChatTemplate(HERMES, "", "<|im_end|>")
    text = template.render([{"role": "user", "content": "hi"}], tools=[PROBE_TOOL])
    assert '"name": "qanat_probe_tool"' in text and text.endswith("<|im_start|>assistant\n")
    assert "<tools>" not in template.render([{"role": "user", "content": "hi"}])
    # transformers' tojson: keys in order, no HTML escapes.
    assert ChatTemplate("{{ messages[0] | tojson }}", "", "").render([{"role": "<b>", "content": "&"}]) == (
        '{"role": "<b>", "content": "&"}')
