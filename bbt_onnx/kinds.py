"""What differs at run time between masked and causal LMs, one record each.

A manifest names its model's kind; encoding, tasks and bench ask that record instead of comparing names. Export's
family registry (`bbt_onnx_export.families`) says which kind each architecture is.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SettingsError

SENTIMENT = " . {text} . It was {mask} ."  # the reference's SST-2 template (the prompt slots come before it)


@dataclass(frozen=True)
class LmKind:
    name: str
    mask_token: bool  # the label word fills a mask token (masked); else it is the next token after the row
    closes_with_eos: bool  # rows end with EOS
    framings: bool  # BOS choice, chat template and suffix prompts (decoders); masked LMs keep the reference's
    prompt_positions: bool  # the graph takes each row's first prompt slot
    example_template: str  # a sentiment template of this kind, for built-in rows (bench, examples)
    example_labels: tuple[tuple[str, str], ...]

    def check_mask(self, template: str, fields: list[str]) -> None:
        """Where this kind lets {mask} stand; a refusal is a user mistake."""
        if self.mask_token and "mask" not in fields:
            raise SettingsError("template has no {mask} placeholder: a masked LM needs to know where the label "
                                "word goes")
        if not self.mask_token and "mask" in fields and not template.rstrip().endswith("{mask}"):
            raise SettingsError("for a causal LM {mask} may only end the template: the label word is the next token")


KINDS: dict[str, LmKind] = {
    "masked": LmKind("masked", mask_token=True, closes_with_eos=True, framings=False, prompt_positions=False,
                     example_template=SENTIMENT, example_labels=(("0", "bad"), ("1", "great"))),
    "causal": LmKind("causal", mask_token=False, closes_with_eos=False, framings=True, prompt_positions=True,
                     example_template=" Review: {text}\nSentiment:",
                     example_labels=(("0", " negative"), ("1", " positive"))),
}
