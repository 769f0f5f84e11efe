"""Llama (2, 3.x) text models."""
from . import register
from .base import ModelAdapter

# Used only when the tokenizer ships no chat template of its own.
LLAMA_CHAT_TEMPLATE = r"""{#- Llama 3 / 3.1 instruct format (header style). -#}
{%- for message in messages -%}
{%- if message['content'] is string -%}{%- set text = message['content'] -%}
{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}{%- endif -%}
{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + text | trim + '<|eot_id|>' -%}
{%- if loop.index0 == 0 -%}{%- set content = bos_token + content -%}{%- endif -%}
{{- content -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

LLAMA = register(ModelAdapter(
    family="llama",
    model_types=("llama",),
    language_model_path="model",
    fallback_chat_template=LLAMA_CHAT_TEMPLATE,
))
