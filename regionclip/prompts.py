"""Prompt templates for class/concept names and GLIP-style text prompts.

RegionCLIP embeds every concept with 81 templates: ``'{}.'`` plus the 80 OpenAI CLIP ImageNet
templates, and averages the un-normalised text embeddings.
"""

from __future__ import annotations

import re

# The 80 templates OpenAI used for ImageNet zero-shot classification (CLIP paper, notebook
# "Prompt_Engineering_for_ImageNet"), in their original order.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "ensemble": ("{}.",) + OPENAI_IMAGENET_TEMPLATES,  # RegionCLIP's 81 templates
    "single": ("a photo of a {}.",),
}


def get_templates(name: str) -> tuple[str, ...]:
    """The templates of a named set (``ensemble`` | ``single``)."""
    try:
        return TEMPLATE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown template set {name!r}; choose one of {sorted(TEMPLATE_SETS)}") from None


def fill(template: str, name: str) -> str:
    """Put ``name`` into ``template`` the way RegionCLIP does: drop ',' and turn '+' into a space.

    Plain replacement (not ``str.format``) so that braces inside a name are kept as text.
    """
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' placeholder")
    return template.replace("{}", name.replace(",", "").replace("+", " "))


def parse_prompt(prompt: str) -> list[str]:
    """Split a GLIP-style prompt into class names: ``"person. bicycle. red umbrella."``.

    Names are separated by dots; ``\\.`` is a dot inside a name (``"st\\. bernard. dog."``).
    Whitespace is collapsed, empty names dropped and duplicates (case-sensitive, after whitespace
    clean-up) removed keeping the first.

    Raises:
        ValueError: the prompt holds no name.
    """
    names: list[str] = []
    for part in re.split(r"(?<!\\)\.", prompt):
        name = " ".join(part.replace("\\.", ".").split())
        if name and name not in names:
            names.append(name)
    if not names:
        raise ValueError(
            f"prompt {prompt!r} has no class names; write them as 'person. bicycle. red umbrella.'"
        )
    return names
