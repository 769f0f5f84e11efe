"""Gemma 2 and Gemma 3 (text-only checkpoints, ``gemma3_text``). Gemma has no system role."""
from . import register
from .base import ModelAdapter

# Used only when the tokenizer ships no chat template of its own.
GEMMA_CHAT_TEMPLATE = r"""{#- Gemma 2 / Gemma 3 format: <start_of_turn>user ... <end_of_turn>; no system role. -#}
{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
{{- raise_exception('System role not supported') -}}
{%- endif -%}
{%- for message in messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{%- endif -%}
{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}
{%- if message['content'] is string -%}{%- set text = message['content'] -%}
{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}{%- endif -%}
{{- '<start_of_turn>' + role + '\n' + text | trim + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""

GEMMA = register(ModelAdapter(
    family="gemma",
    model_types=("gemma2", "gemma3_text"),
    language_model_path="model",
    fallback_chat_template=GEMMA_CHAT_TEMPLATE,
    supports_system_role=False,
))
