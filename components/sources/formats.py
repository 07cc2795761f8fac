"""Named input formats (`schema` of a file source): how a source row becomes a row of one of the three shapes.

    schema              columns                                   shapes
    sft                 prompt, completion                        sft
    messages            messages: [{role, content}]               sft, prompts
    sharegpt            conversations: [{from, value}]            sft, prompts
    alpaca              instruction, input?, output, system?      sft, prompts
    preference          prompt, chosen, rejected (strings)        preference
    preference_messages chosen, rejected: message lists, prompt?  preference
    hh                  chosen, rejected: "\\n\\nHuman: ... \\n\\nAssistant: ..." preference
    prompts             prompt, answer?, task?, split?            prompts

`auto` tells each row's schema from the columns it has (a row with the columns of none is named as a row of
the schema of its file's earlier rows). A column is found through `fields` (schema column → source column, a
dotted path reaching into nested objects: `prompt: meta.question`). Each converter returns the row in the
shape's own fields (what components.datasets parses), and a map from those fields back to the source's columns,
for error messages.
"""

from __future__ import annotations

import re

from components.datasets import TOOL_ROLES, RowError

SCHEMAS = ("auto", "sft", "messages", "sharegpt", "alpaca", "preference", "preference_messages", "hh", "prompts")
# schema → (shapes it gives, its columns); the first columns of each are required to detect it.
COLUMNS = {
    "sft": ("prompt", "completion"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output", "input", "system"),
    "preference": ("prompt", "chosen", "rejected"),
    "preference_messages": ("chosen", "rejected", "prompt"),
    "hh": ("chosen", "rejected"),
    "prompts": ("prompt", "answer", "task", "split"),
}
SHAPE_SCHEMAS = {  # in the order auto tries them; the first is the shape's own
    "sft": ("sft", "messages", "sharegpt", "alpaca"),
    "preference": ("preference", "preference_messages", "hh"),
    "prompts": ("prompts", "messages", "sharegpt", "alpaca"),
}
ALPACA_TEMPLATE = "{instruction}\n\n{input}"
# Speaker names of chat datasets (ShareGPT's `from`, and what some datasets put in `role`).
SPEAKERS = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
            "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_MISSING = object()


def columns(shape: str, schema: str) -> tuple[str, ...]:
    """The columns `fields` may map for a source of this shape and schema."""
    names: list[str] = []
    for s in (SHAPE_SCHEMAS[shape] if schema == "auto" else (schema,)):
        names += [c for c in COLUMNS[s] if c not in names]
    return tuple(names)


def lookup(raw: dict, path: str):
    """A column's value: the key itself when the row has it, else a dotted path into nested objects and lists
    (`meta.question`, `turns.0.text`); _MISSING when absent."""
    if path in raw:
        return raw[path]
    value = raw
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


class Columns:
    """A raw row seen through `fields`: `get(name)` is the schema column's value (None when absent)."""

    def __init__(self, raw: dict, fields: dict[str, str]):
        self.raw, self.fields = raw, fields

    def name(self, column: str) -> str:
        return self.fields.get(column, column)

    def get(self, column: str):
        value = lookup(self.raw, self.name(column))
        return None if value is _MISSING else value

    def has(self, *names: str) -> bool:
        return all(self.get(n) is not None for n in names)


def detect(shape: str, row: Columns) -> str | None:
    """The schema of a row, from the columns it has; None when it has the columns of none."""
    for schema in SHAPE_SCHEMAS[shape]:
        if schema == "hh":
            ok = isinstance(row.get("chosen"), str) and HH_TURN.search(row.get("chosen"))
        elif schema == "preference_messages":
            ok = isinstance(row.get("chosen"), list)
        elif schema == "preference":
            ok = row.has(*COLUMNS[schema]) and not isinstance(row.get("chosen"), list)
        elif schema == "alpaca":
            ok = row.has("instruction") and (shape == "prompts" or row.has("output"))
        elif schema == "prompts":
            ok = row.has("prompt")
        else:
            ok = row.has(*COLUMNS[schema][:{"sft": 2}.get(schema, 1)])
        if ok:
            return schema
    return None


def chat(messages, name: str, where: tuple[str, int]) -> list | RowError | object:
    """A message list in {role, content} form: ShareGPT's {from, value} turns renamed (human → user, gpt →
    assistant, ...). Anything else is left for components.datasets to check and name."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return messages
        role_key = "from" if "from" in m and "role" not in m else "role"
        content_key = "value" if "value" in m and "content" not in m else "content"
        role = m.get(role_key)
        if isinstance(role, str) and role.lower() in TOOL_ROLES:
            return RowError(*where, f"{name}[{i}].{role_key}", f"tool turns are not supported (got {role!r}): "
                                                               "give conversations of system, user and assistant "
                                                               "turns only")
        if isinstance(role, str) and role_key == "from":
            role = SPEAKERS.get(role.lower(), role)
        msg = {"role": role, "content": m.get(content_key)}
        msg.update({k: v for k, v in m.items() if k in ("tool_calls", "function_call")})
        out.append(msg)
    return out


class Renames:
    """Maps a field of the shape's row back to the source's column, for error messages."""

    def __init__(self, heads: dict[str, str], turns: bool = False):
        self.heads, self.turns = heads, turns

    def __call__(self, field: str) -> str:
        head, rest = re.match(r"([^.\[]*)(.*)", field).groups()
        if self.turns:
            rest = re.sub(r"\.role$", ".from", re.sub(r"\.content$", ".value", rest))
        return self.heads.get(head, head) + rest


def _hh_turns(text: str, name: str, where: tuple[str, int]) -> list[dict] | RowError:
    """An HH-RLHF conversation string as messages: "\\n\\nHuman: ..." → user, "\\n\\nAssistant: ..." → assistant."""
    if not isinstance(text, str):
        return RowError(*where, name, f"must be a string of \\n\\nHuman: and \\n\\nAssistant: turns "
                                      f"(got {type(text).__name__})")
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 5:
        return RowError(*where, name, 'expected "\\n\\nHuman: ..." and "\\n\\nAssistant: ..." turns, from the '
                                      "Human's, ending with the Assistant's")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def _sibling(path: str, name: str) -> str:
    """The column `name` beside the column at dotted `path` (`meta.instruction` → `meta.input`)."""
    return path.rsplit(".", 1)[0] + "." + name if "." in path else name


def _alpaca_input(row: Columns):
    """The alpaca `input` of a row read with an alpaca mapping (`fields: {prompt: instruction, ...}`, how alpaca
    data was read before the alpaca schema): the value of the input column beside the prompt's instruction
    column, unless `fields` maps that column too; None otherwise."""
    source = row.name("prompt")
    if source.rsplit(".", 1)[-1] != "instruction":
        return None
    column = _sibling(source, "input")
    if column in row.fields.values():
        return None
    value = lookup(row.raw, column)
    return None if value is _MISSING else value


def _plain(schema: str, shape: str, row: Columns, where: tuple[str, int], alpaca_template: str,
           ) -> tuple[dict | RowError, Renames]:
    """Sft, preference or prompts columns as they are (a prompt may be a message list)."""
    n = row.name
    out = {c: row.get(c) for c in COLUMNS[schema] if row.get(c) is not None}
    extra = _alpaca_input(row)
    if extra is not None:
        if not isinstance(extra, str):
            return RowError(*where, _sibling(n("prompt"), "input"), f"must be a string (got "
                                                                     f"{type(extra).__name__})"), Renames({})
        if extra.strip() and isinstance(out.get("prompt"), str):  # as the alpaca schema joins it: never dropped
            out["prompt"] = alpaca_template.replace("{instruction}", out["prompt"]).replace("{input}", extra)
    if isinstance(out.get("prompt"), list):
        out["prompt"] = chat(out["prompt"], n("prompt"), where)
        if isinstance(out["prompt"], RowError):
            return out["prompt"], Renames({})
    return out, Renames({c: n(c) for c in COLUMNS[schema]})


def _chat(schema: str, shape: str, row: Columns, where: tuple[str, int], alpaca_template: str,
          ) -> tuple[dict | RowError, Renames]:
    """A messages or sharegpt conversation: all of it for sft, before its last assistant turn for prompts."""
    n = row.name
    column = "messages" if schema == "messages" else "conversations"
    value = row.get(column)
    turns = isinstance(value, list) and any(isinstance(m, dict) and "from" in m for m in value)
    messages = chat(value, n(column), where)
    renames = Renames({"messages": n(column), "prompt": n(column)}, turns)
    if isinstance(messages, RowError):
        return messages, renames
    if value is None:
        return RowError(*where, n(column), "missing (a conversation: a list of messages)"), renames
    if shape == "prompts":
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # a prompt is the conversation before its last assistant turn
        return {"prompt": messages}, renames
    return {"messages": messages}, renames


def _alpaca(schema: str, shape: str, row: Columns, where: tuple[str, int], alpaca_template: str,
            ) -> tuple[dict | RowError, Renames]:
    """Alpaca's instruction, input (joined by the template, never dropped), optional system and output."""
    n = row.name
    renames = Renames({"prompt": n("instruction"), "completion": n("output")})
    instruction, extra, system = row.get("instruction"), row.get("input"), row.get("system")
    for column, value in (("instruction", instruction), ("input", extra), ("system", system)):
        if value is not None and not isinstance(value, str):
            return RowError(*where, n(column), f"must be a string (got {type(value).__name__})"), renames
    if instruction is None or not instruction.strip():
        need = "missing" if instruction is None else "empty"
        return RowError(*where, n("instruction"), f"{need} (an alpaca row needs an instruction)"), renames
    prompt = instruction
    if extra and extra.strip():  # the input is never dropped: it joins the instruction through the template
        prompt = alpaca_template.replace("{instruction}", instruction).replace("{input}", extra)
    if system and system.strip():
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    out = {"prompt": prompt}
    if shape == "sft":
        out["completion"] = row.get("output")
    return out, renames


def _preference_messages(schema: str, shape: str, row: Columns, where: tuple[str, int], alpaca_template: str,
                         ) -> tuple[dict | RowError, Renames]:
    """Chosen and rejected message lists (UltraFeedback): the prompt is the conversation before the answer."""
    n = row.name
    renames = Renames({"prompt": n("chosen"), "chosen": n("chosen"), "rejected": n("rejected")})
    pair = {}
    for side in ("chosen", "rejected"):
        value = chat(row.get(side), n(side), where)
        if isinstance(value, RowError):
            return value, renames
        if value is None:
            return RowError(*where, n(side), "missing (a preference_messages row needs 'chosen' and "
                                             "'rejected' message lists)"), renames
        if not isinstance(value, list) or not value or not isinstance(value[-1], dict) \
                or value[-1].get("role") != "assistant":
            return RowError(*where, n(side), "must be a list of messages ending with the assistant's "
                                             "answer"), renames
        pair[side] = value
    prompt = pair["chosen"][:-1]
    if not prompt:  # chosen and rejected hold only the answers: the prompt is its own column
        renames.heads["prompt"] = n("prompt")
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            prompt = chat(prompt, n("prompt"), where)
            if isinstance(prompt, RowError):
                return prompt, renames
    if pair["rejected"][:-1] not in ([], pair["chosen"][:-1]):
        return RowError(*where, n("rejected"), "its conversation before the answer differs from chosen's "
                                               "(a pair answers one prompt)"), renames
    out = {"chosen": pair["chosen"][-1].get("content"), "rejected": pair["rejected"][-1].get("content")}
    return ({"prompt": prompt, **out} if prompt is not None else out), renames


def _hh(schema: str, shape: str, row: Columns, where: tuple[str, int], alpaca_template: str,
        ) -> tuple[dict | RowError, Renames]:
    """HH-RLHF strings (Human/Assistant turns): the prompt is the turns before the last answer."""
    n = row.name
    renames = Renames({"prompt": n("chosen"), "chosen": n("chosen"), "rejected": n("rejected")})
    pair = {}
    for side in ("chosen", "rejected"):
        value = row.get(side)
        if value is None:
            return RowError(*where, n(side), "missing (an hh row needs 'chosen' and 'rejected' "
                                             "conversations)"), renames
        turns = _hh_turns(value, n(side), where)
        if isinstance(turns, RowError):
            return turns, renames
        if turns[-1]["role"] != "assistant":
            return RowError(*where, n(side), "the last turn must be the Assistant's"), renames
        pair[side] = turns
    if pair["chosen"][:-1] != pair["rejected"][:-1]:
        return RowError(*where, n("rejected"), "its turns before the last Assistant turn differ from chosen's "
                                               "(a pair answers one prompt)"), renames
    return {"prompt": pair["chosen"][:-1], "chosen": pair["chosen"][-1]["content"],
            "rejected": pair["rejected"][-1]["content"]}, renames


CONVERTERS = {"sft": _plain, "preference": _plain, "prompts": _plain, "messages": _chat, "sharegpt": _chat,
              "alpaca": _alpaca, "preference_messages": _preference_messages, "hh": _hh}


def convert(schema: str, shape: str, row: Columns, where: tuple[str, int],
            alpaca_template: str = ALPACA_TEMPLATE) -> tuple[dict | RowError, Renames]:
    """The row in the shape's fields (to be checked by components.datasets' parser of that shape)."""
    if schema not in CONVERTERS:
        raise ValueError(f"unknown schema {schema!r}")
    return CONVERTERS[schema](schema, shape, row, where, alpaca_template)


class RowReader:
    """Turns a source's raw rows into rows of its shape, in normal form, or a RowError naming the source's
    column. With schema auto, each row is read in the schema whose columns it has; a row that has the columns
    of none is named as a row of the schema its file's rows had so far (or of the shape's own schema)."""

    def __init__(self, shape: str, schema: str = "auto", fields: dict[str, str] | None = None,
                 split: str | None = None, alpaca_template: str = ALPACA_TEMPLATE):
        self.shape, self.schema, self.fields, self.split = shape, schema, fields or {}, split
        self.alpaca_template = alpaca_template
        self.detected: dict[str, str] = {}  # file → its schema

    def schema_of(self, file: str, row: Columns) -> str:
        if self.schema != "auto":
            return self.schema
        found = detect(self.shape, row)
        if found is None:  # named as a row of its file's schema so far, or of the shape's own
            return self.detected.get(file, SHAPE_SCHEMAS[self.shape][0])
        self.detected[file] = found
        return found

    def __call__(self, raw: dict, file: str, line: int) -> dict | RowError:
        from components.datasets import ROW_PARSERS

        cols = Columns(raw, self.fields)
        row, renames = convert(self.schema_of(file, cols), self.shape, cols, (file, line), self.alpaca_template)
        if isinstance(row, RowError):
            return row
        if self.split and self.shape == "prompts" and row.get("split") is None:
            row["split"] = self.split
        parsed = ROW_PARSERS[self.shape](row, file, line)
        if isinstance(parsed, RowError):
            parsed.field = renames(parsed.field)
        return parsed
