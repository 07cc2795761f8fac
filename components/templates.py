"""Prompts and completions as text through a tokenizer's chat template, light: no torch, so that a step that only
renders text (data_prep) does not import it. Tokenizing them: components/training/batching.py (encode_example)."""

from __future__ import annotations


def render_prompt_completion(tokenizer, prompt, completion: str) -> tuple[str, str]:
    """Render a prompt (a string or chat messages) and its completion as text through the chat template.

    Returns (prompt_text, completion_text), prompt_text ending with the generation prompt, so that
    the completion's tokens are exactly what a model generates. Without a chat template, a string prompt
    is used as is and the completion ends with the EOS token.
    """
    if tokenizer.chat_template is None:
        if not isinstance(prompt, str):
            raise ValueError("chat messages need a tokenizer with a chat template")
        return prompt, completion + (tokenizer.eos_token or "")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                              tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    return prompt_text, full_text[len(prompt_text):]


def render_prompt(tokenizer, prompt) -> str:
    """The text a model is given to generate a completion for `prompt`."""
    if tokenizer.chat_template is None:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
