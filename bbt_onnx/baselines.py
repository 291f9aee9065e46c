"""What a tuned prompt must beat, and where tuning starts: the plain template in every framing the model allows, and
the candidate tokens for the prompt slots at z = 0. Each is a list of named choices; scoring them is the caller's.

The plain template is the user's own prompt, written by hand: for a decoder with and without the tokenizer's BOS
and inside the chat template (when the model has one); for a masked LM, the template. When the task has
demonstrations, each framing is scored without them and with them (in-context learning), so that a prompt tuned
on top of demonstrations must beat both. Prompt slots filled with
arbitrary ids cost accuracy before tuning starts (on SmolLM2 and MR, the reference's ids cost 3.5 to 7.7 points),
so the start is chosen among cheap fillers: the reference's ids, a whitespace token, a newline token, the
template's own words, or the user's text.
"""

from __future__ import annotations

import string
from dataclasses import replace

from tokenizers import Tokenizer

from .encoding import init_placeholders
from .manifest import Manifest
from .tasks import Task, make_framing

AUTO, REFERENCE = "auto", "reference"


def framing_name(task: Task) -> str:
    f = task.framing
    what = "in-context" if task.demonstrations else "template"
    if f.chat:
        return f"{what} (chat)"
    return {"auto": f"{what} (BOS)", "never": f"{what} (no BOS)"}.get(f.bos, f"{what} (BOS {f.bos})")


def plain_framings(task: Task, manifest: Manifest) -> list[tuple[str, Task]]:
    """(name, task) for the template alone in the task's own framing and each other one the model allows; with
    demonstrations, each of those without them and then with them; with further words a class (a multi-word
    verbalizer), all of those read by the label words alone and then by every word."""
    if task.extra_words:
        bare = plain_framings(task.with_extra_words(), manifest)
        return bare + [(f"{name} + words", framed.with_extra_words(task.extra_words)) for name, framed in bare]
    if task.demonstrations:
        return plain_framings(task.without_demonstrations(), manifest) + \
            [(framing_name(framed), framed) for _, framed in _framings(task, manifest)]
    return _framings(task, manifest)


def _framings(task: Task, manifest: Manifest) -> list[tuple[str, Task]]:
    if not manifest.lm.framings:
        return [("in-context" if task.demonstrations else "template", task)]
    position = task.framing.position
    options = [task] + [replace(task, framing=make_framing(bos, chat, position))
                        for bos, chat in (("auto", False), ("never", False), ("auto", True))
                        if not chat or manifest.has_chat]
    out: list[tuple[str, Task]] = []
    for option in options:
        if manifest.bos_id is None and option.framing.bos == "auto" and not option.framing.chat:
            option = replace(option, framing=make_framing("never", False, position))  # no BOS to add: the same
        if all(option.framing != other.framing for _, other in out):
            out.append((framing_name(option), option))
    return out


def single_token(tokenizer: Tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ids[0] if len(ids) == 1 else None


def template_words(task: Task) -> str:
    """The template's own text, its fields left out."""
    return "".join(literal for literal, _, _, _ in string.Formatter().parse(task.template))


def init_candidates(tokenizer: Tokenizer, manifest: Manifest, task: Task, prompt_tokens: int,
                    text: str | None = None) -> list[tuple[str, list[int]]]:
    """(name, ids) for the prompt slots: the user's text alone when given (it must be exactly P tokens), else the
    reference's ids and the cheap fillers this tokenizer has; a filler of one token fills every slot, the template's
    words repeat to fill them."""
    if text is not None:
        return [("text", init_placeholders(tokenizer, text, prompt_tokens))]
    out = [(REFERENCE, list(manifest.placeholder_ids[:prompt_tokens]))]
    for name, filler in (("spaces", " "), ("newlines", "\n")):
        token = single_token(tokenizer, filler)
        if token is not None:
            out.append((name, [token] * prompt_tokens))
    words = tokenizer.encode(template_words(task), add_special_tokens=False).ids
    if words:
        out.append(("template words", [words[i % len(words)] for i in range(prompt_tokens)]))
    seen, unique = set(), []
    for name, ids in out:
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            unique.append((name, ids))
    return unique


def init_choice(setting: str | None) -> tuple[str, str | None]:
    """--prompt-init as (mode, text): auto, reference, or the user's text (None is the reference, as runs from
    before auto recorded it)."""
    if setting is None or setting == REFERENCE:
        return REFERENCE, None
    if setting == AUTO:
        return AUTO, None
    return "text", setting
