"""Mistral text models."""
from . import register
from .base import ModelAdapter

# Used only when the tokenizer ships no chat template of its own.
MISTRAL_CHAT_TEMPLATE = r"""{#- Mistral instruct format: [INST] ... [/INST]; a system message is prepended to the first user turn. -#}
{%- if messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set system_message = none -%}{%- set loop_messages = messages -%}{%- endif -%}
{{- bos_token -}}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{%- endif -%}
{%- if message['content'] is string -%}{%- set text = message['content'] -%}
{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}{%- endif -%}
{%- if message['role'] == 'user' -%}
{%- if loop.first and system_message is not none -%}{%- set text = system_message + '\n\n' + text -%}{%- endif -%}
{{- '[INST] ' + text + ' [/INST]' -}}
{%- elif message['role'] == 'assistant' -%}
{{- ' ' + text + eos_token -}}
{%- else -%}
{{- raise_exception('Only user, assistant and a leading system role are supported') -}}
{%- endif -%}
{%- endfor -%}
"""

MISTRAL = register(ModelAdapter(
    family="mistral",
    model_types=("mistral",),
    language_model_path="model",
    fallback_chat_template=MISTRAL_CHAT_TEMPLATE,
))
