"""The family registry: an architecture defined outside the package is one registered record, found by export's
lookup and by the tiny-model recipes; a second record for a model_type is refused."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest

from bbt_onnx.errors import SettingsError
from bbt_onnx_export import ExportError
from bbt_onnx_export.families import FAMILIES, Tiny, family_of, register
from bbt_onnx_export.tiny import llama_config, make_tiny, make_tokenizer


@pytest.fixture
def registry():
    """The registry, restored after the test."""
    saved = dict(FAMILIES)
    yield FAMILIES
    FAMILIES.clear()
    FAMILIES.update(saved)


def test_a_registered_family_is_found_and_a_duplicate_refused(registry, tmp_path):
    from transformers import AutoConfig, MistralConfig

    # Mistral is Llama's layout under another class: the Llama record with its own names and tiny recipe
    mistral = replace(registry["llama"], architecture="MistralForCausalLM", model_type="mistral",
                      tiny=Tiny(make_tokenizer, partial(llama_config, cls="MistralConfig")))
    with pytest.raises(ExportError, match="MistralForCausalLM is not supported"):
        family_of(MistralConfig(architectures=["MistralForCausalLM"]))
    with pytest.raises(ValueError, match="no tiny recipe"):
        make_tiny(tmp_path / "before", "MistralForCausalLM")
    assert register(mistral) is mistral
    config = AutoConfig.from_pretrained(make_tiny(tmp_path / "src", "MistralForCausalLM"))
    assert config.model_type == "mistral" and family_of(config) is mistral

    with pytest.raises(SettingsError, match="model_type 'mistral' is already registered") as refused:
        register(replace(mistral, architecture="OtherForCausalLM"))
    assert refused.value.arguments == ("replace",) and family_of(config) is mistral
    other = register(replace(mistral, label_prefix=""), replace=True)
    assert family_of(config) is other

