"""Class prompts: one template per dataset, filled with each class name.

- `generic`: "a photo of a {}." for every dataset (what PERL's step-0 curves suggest).
- `coop`: CoOp's `CUSTOM_TEMPLATES` (`trainers/zsclip.py`, identical in MMRL), i.e. the
  `template` of the dataset's `DatasetSpec`; synthetic and user datasets carry their own there.
- any string containing "{}" is used as the template itself.

Class names are cleaned as every CoOp-family method does: `classname.replace("_", " ")`.
"""

from __future__ import annotations

from typing import Sequence

GENERIC_TEMPLATE = "a photo of a {}."
TEMPLATE_CHOICES = ("generic", "coop")

# CoOp's CUSTOM_TEMPLATES, keyed by CoOp's DATASET.NAME (its cfg name), verbatim.
CUSTOM_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}


def template_for(dataset: str, template: str = "generic") -> str:
    """The template string used for `dataset` under the `template` choice."""
    if template == "generic":
        return GENERIC_TEMPLATE
    if template == "coop":
        from perl_core.data.registry import get_spec

        return get_spec(dataset).template
    if "{}" in template:
        return template
    raise ValueError(f"template={template!r} is not one of {list(TEMPLATE_CHOICES)} "
                     f"(nor a format string with '{{}}')")


def clean_classname(classname: str) -> str:
    return classname.replace("_", " ")


def class_prompts(classnames: Sequence[str], dataset: str = "", template: str = "generic"
                  ) -> list[str]:
    """One prompt per class name, in order: `template_for(dataset, template).format(name)`."""
    if isinstance(classnames, str):
        raise TypeError("class_prompts: classnames must be a sequence of names, not one string")
    fmt = template_for(dataset, template)
    if fmt.count("{}") != 1:
        raise ValueError(f"template {fmt!r} of dataset {dataset!r} must contain '{{}}' exactly "
                         f"once")
    return [fmt.format(clean_classname(c)) for c in classnames]


__all__ = ["class_prompts", "template_for", "clean_classname", "GENERIC_TEMPLATE",
           "CUSTOM_TEMPLATES", "TEMPLATE_CHOICES"]
