"""Qwen2 / Qwen2.5 and Qwen3 text models (ChatML)."""
from . import register
from .base import ModelAdapter

# Used only when the tokenizer ships no chat template of its own.
QWEN2_CHAT_TEMPLATE = r"""{#- Qwen2 / Qwen2.5 ChatML format with the default system prompt. -#}
{%- for message in messages -%}
{%- if loop.first and messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- if message['content'] is string -%}{%- set text = message['content'] -%}
{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}{%- endif -%}
{{- '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# Used only when the tokenizer ships no chat template of its own.
QWEN3_CHAT_TEMPLATE = r"""{#- Qwen3 ChatML format: no default system prompt; enable_thinking=false adds an empty think block. -#}
{%- for message in messages -%}
{%- if message['content'] is string -%}{%- set text = message['content'] -%}
{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}{%- endif -%}
{{- '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
"""

QWEN2 = register(ModelAdapter(
    family="qwen2",
    model_types=("qwen2",),
    language_model_path="model",
    fallback_chat_template=QWEN2_CHAT_TEMPLATE,
))

QWEN3 = register(ModelAdapter(
    family="qwen3",
    model_types=("qwen3",),
    language_model_path="model",
    fallback_chat_template=QWEN3_CHAT_TEMPLATE,
))
