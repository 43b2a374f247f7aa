"""The model families the vLLM plugin anchors, keyed by ``config.model_type``.

The plugin scores each request's encoder outputs (``embed_multimodal``, one row per
embedding position of the item), which is family-agnostic only where those rows are what
the transformers path scores (the projector output at the placeholder positions, see
``videoanchor/integrations/transformers/registry.py``); for a family whose encoder output
also carries other features (Qwen3-VL's deepstack), :func:`projector_columns` says which
columns are the projector output. This table says, per family of
that registry, whether vLLM 0.32 has it, whether its encoder outputs line up, and whether
it is tested end to end here; an anchored engine on any other family fails at start-up
(:func:`check_family`), naming the family.

:func:`register_family` / :func:`unregister_family` add a family to the table (or take one
out) in this process: for a model whose encoder outputs line up with what the SSC should
read, under a ``model_type`` the table does not know (a new family vLLM serves, a
checkpoint with a ``model_type`` of its own). Such a family (``tested`` False, the
default) is anchored with a start-up warning that it is not tested end to end here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = [
    "FAMILIES",
    "Family",
    "check_family",
    "projector_columns",
    "register_family",
    "unregister_family",
]

logger = logging.getLogger("videoanchor.vllm")


@dataclass(frozen=True)
class Family:
    """One family: ``name``, vLLM's architecture class, ``tested`` (end to end on a real
    engine against the transformers path, tests/test_vllm*.py), ``refused`` (why the
    plugin refuses it; empty when it anchors it), ``deepstack``: vLLM's encoder output of
    an item is the projector output followed by the deepstack features (Qwen3-VL), see
    :func:`projector_columns`."""

    name: str
    architecture: str
    tested: bool = False
    refused: str = ""
    deepstack: bool = False


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", tested=True),
    "llava_onevision": Family(
        "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", tested=True
    ),
    "qwen2_vl": Family("Qwen2-VL", "Qwen2VLForConditionalGeneration", tested=True),
    "llava_next_video": Family(
        "LLaVA-NeXT-Video", "LlavaNextVideoForConditionalGeneration", tested=True
    ),
    # vLLM runs the HF-format InternVL with its InternS1 module.
    "internvl": Family("InternVL (HF format)", "InternVLForConditionalGeneration", tested=True),
    # vLLM's encoder output concatenates the deepstack features after the projector output
    # (see projector_columns); the SSC reads the projector output alone, as transformers.
    "qwen3_vl": Family("Qwen3-VL", "Qwen3VLForConditionalGeneration", tested=True, deepstack=True),
}


def register_family(model_type: str, family: Family) -> None:
    """Adds ``family`` to :data:`FAMILIES` under ``model_type`` (``hf_config.model_type``) in
    this process, so that an anchored engine on it starts (:func:`check_family`) and its
    SSC reads its encoder outputs (:func:`projector_columns`: all columns, or the projector
    columns where ``family.deepstack``).

    Only for a family whose vLLM encoder output (``embed_multimodal``) is, row for row,
    what the SSC should score: one row per embedded placeholder position of the item,
    as for the families of the table. Register it in every process that checks or runs
    the engine (the front end and the workers: a ``vllm.general_plugins`` entry point of
    your own that vLLM loads in each of them), before the engine starts. Raises ValueError
    if ``model_type`` is in the table already (:func:`unregister_family` it first), and
    TypeError if ``family`` is not a :class:`Family`."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family: expected a Family, got {type(family).__name__}")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"register_family: expected a model_type string, got {model_type!r}")
    if model_type in FAMILIES:
        raise ValueError(
            f"register_family: model_type {model_type!r} is registered already "
            f"({FAMILIES[model_type].name}); unregister_family({model_type!r}) first"
        )
    FAMILIES[model_type] = family


def unregister_family(model_type: str) -> Family:
    """Takes ``model_type`` out of :data:`FAMILIES` in this process and returns its
    :class:`Family` (an anchored engine on it then fails at start-up, as for any family the
    table does not know); ValueError if it is not there."""
    try:
        return FAMILIES.pop(model_type)
    except KeyError:
        raise ValueError(
            f"unregister_family: model_type {model_type!r} is not registered"
        ) from None


def check_family(model_type: str | None) -> Family:
    """The entry of ``model_type`` (``hf_config.model_type``) for an anchored engine.

    Raises NotImplementedError naming the family when the plugin refuses it or does not
    know it; logs a warning for a family anchored but not tested end to end."""
    fam = FAMILIES.get(model_type or "")
    usable = ", ".join(f"{k} ({f.name})" for k, f in FAMILIES.items() if not f.refused)
    hint = (
        "start the engine without additional_config['videoanchor'] to serve it unanchored, "
        "or use the transformers path (videoanchor.configure)"
    )
    if fam is None:
        raise NotImplementedError(
            f"additional_config['videoanchor']: model family {model_type!r} is not supported "
            f"by videoanchor's vLLM plugin; expected config.model_type one of {usable}; {hint}"
        )
    if fam.refused:
        raise NotImplementedError(
            f"additional_config['videoanchor']: model family {model_type!r} ({fam.name}) is "
            f"not supported by videoanchor's vLLM plugin: {fam.refused}; {hint}"
        )
    if not fam.tested:
        logger.warning(
            "videoanchor: %s (%s) is anchored by the vLLM plugin but not tested end to end "
            "against the transformers path; tested: %s",
            model_type, fam.name,
            ", ".join(k for k, f in FAMILIES.items() if f.tested),
        )  # fmt: skip
    return fam


def projector_columns(hf_config) -> int | None:
    """How many leading columns of vLLM's encoder output of an item are the projector output
    (what the transformers path scores), or None where all of them are.

    vLLM 0.32's Qwen3-VL (``vllm/model_executor/models/qwen3_vl.py``) returns from
    ``embed_multimodal`` one (tokens, hidden * (1 + len(deepstack_visual_indexes))) tensor per
    item: the merger output, then one block per deepstack merger; ``embed_input_ids`` splits
    it again at ``vision_config.out_hidden_size`` (the text hidden size), putting the first
    block into the input embeddings and the others into the deepstack layers. ``hf_config``:
    the engine's ``model_config.hf_config``. Raises ValueError where the two sizes differ."""
    fam = FAMILIES.get(getattr(hf_config, "model_type", None) or "")
    if fam is None or not fam.deepstack:
        return None
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    hidden = int(text.hidden_size)
    out = getattr(getattr(hf_config, "vision_config", None), "out_hidden_size", hidden)
    if int(out) != hidden:
        raise ValueError(
            f"videoanchor: expected the {fam.name} vision out_hidden_size to equal the text "
            f"hidden_size, got {out} and {hidden}; this checkpoint is not supported by the "
            "vLLM plugin"
        )
    return hidden
