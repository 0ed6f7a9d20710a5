"""The 15 real benchmarks of the paper, registered with CoOp's folder layout (CoOp DATASETS.md).

| canonical | CoOp cfg name | folder | image root | loader |
|---|---|---|---|---|
| ImageNet | ImageNet | imagenet | images/{train,val}/<wnid>/ | imagenet |
| Caltech101 | Caltech101 | caltech-101 | 101_ObjectCategories | split_zhou_Caltech101.json |
| OxfordPets | OxfordPets | oxford_pets | images | split_zhou_OxfordPets.json |
| StanfordCars | StanfordCars | stanford_cars | (the folder itself) | split_zhou_StanfordCars.json |
| Flowers102 | OxfordFlowers | oxford_flowers | jpg | split_zhou_OxfordFlowers.json |
| Food101 | Food101 | food-101 | images | split_zhou_Food101.json |
| FGVCAircraft | FGVCAircraft | fgvc_aircraft | images | variants.txt + images_variant_*.txt |
| SUN397 | SUN397 | sun397 | SUN397 | split_zhou_SUN397.json |
| DTD | DescribableTextures | dtd | images | split_zhou_DescribableTextures.json |
| EuroSAT | EuroSAT | eurosat | 2750 | split_zhou_EuroSAT.json |
| UCF101 | UCF101 | ucf101 | UCF-101-midframes | split_zhou_UCF101.json |
| ImageNetV2 | ImageNetV2 | imagenetv2 | imagenetv2-matched-frequency-format-val/<i>/ | test only |
| ImageNetSketch | ImageNetSketch | imagenet-sketch | images/<wnid>/ | test only, 1000-way |
| ImageNetA | ImageNetA | imagenet-adversarial | imagenet-a/<wnid>/ | test only, 200-way |
| ImageNetR | ImageNetR | imagenet-rendition | imagenet-r/<wnid>/ | test only, 200-way |

Names are looked up case-insensitively with '-' and '_' ignored; the aliases add CoOp's cfg names,
the folder names and the short names used in tables ("pets", "flowers", "aircraft", ...).
The ImageNet variants keep a copy of `imagenet/classnames.txt` in their own folder.
`extra["layout"]` of an ImageNet variant: "index" (V2: folders 0..999, label = int(folder)) or
"wnid" (label = position of the wnid folder in sorted order, as CoOp does).
"""

from __future__ import annotations

from perl_core.data.registry import DatasetSpec, register
from perl_core.data.templates import CUSTOM_TEMPLATES

COOP_CFG_NAMES = {  # canonical -> CoOp DATASET.NAME, where they differ
    "Flowers102": "OxfordFlowers",
    "DTD": "DescribableTextures",
}


def _t(canonical: str) -> str:
    return CUSTOM_TEMPLATES[COOP_CFG_NAMES.get(canonical, canonical)]


def _split(canonical: str, dataset_dir: str, image_dir: str, num_classes: int,
           aliases: tuple[str, ...]) -> DatasetSpec:
    cfg = COOP_CFG_NAMES.get(canonical, canonical)
    return DatasetSpec(name=canonical, dataset_dir=dataset_dir, image_dir=image_dir,
                       template=_t(canonical), loader="split_json",
                       split_file=f"split_zhou_{cfg}.json",
                       aliases=tuple(dict.fromkeys((cfg, dataset_dir, *aliases))),
                       num_classes=num_classes)


def _variant(canonical: str, dataset_dir: str, image_dir: str, num_classes: int, layout: str,
             aliases: tuple[str, ...]) -> DatasetSpec:
    return DatasetSpec(name=canonical, dataset_dir=dataset_dir, image_dir=image_dir,
                       template=_t(canonical), loader="imagenet_variant",
                       aliases=tuple(dict.fromkeys((dataset_dir, *aliases))),
                       num_classes=num_classes, test_only=True, source="ImageNet",
                       extra={"layout": layout})


BENCHMARKS: tuple[DatasetSpec, ...] = (
    DatasetSpec(name="ImageNet", dataset_dir="imagenet", image_dir="images",
                template=_t("ImageNet"), loader="imagenet",
                aliases=("imagenet", "in1k", "imagenet1k"), num_classes=1000),
    _split("Caltech101", "caltech-101", "101_ObjectCategories", 100, ("caltech",)),
    _split("OxfordPets", "oxford_pets", "images", 37, ("pets",)),
    _split("StanfordCars", "stanford_cars", "", 196, ("cars",)),
    _split("Flowers102", "oxford_flowers", "jpg", 102, ("flowers", "oxford_flowers_102")),
    _split("Food101", "food-101", "images", 101, ("food",)),
    DatasetSpec(name="FGVCAircraft", dataset_dir="fgvc_aircraft", image_dir="images",
                template=_t("FGVCAircraft"), loader="fgvc",
                aliases=("fgvc_aircraft", "aircraft", "fgvc"), num_classes=100),
    _split("SUN397", "sun397", "SUN397", 397, ("sun",)),
    _split("DTD", "dtd", "images", 47, ("textures",)),
    _split("EuroSAT", "eurosat", "2750", 10, ()),
    _split("UCF101", "ucf101", "UCF-101-midframes", 101, ("ucf",)),
    _variant("ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", 1000, "index",
             ("imagenet-v2", "imagenet_v2")),
    _variant("ImageNetSketch", "imagenet-sketch", "images", 1000, "wnid", ("imagenet_sketch",)),
    _variant("ImageNetA", "imagenet-adversarial", "imagenet-a", 200, "wnid", ("imagenet-a",)),
    _variant("ImageNetR", "imagenet-rendition", "imagenet-r", 200, "wnid", ("imagenet-r",)),
)

# the base-to-novel and cross-dataset suite (11) and the domain-generalisation targets (4)
B2N_DATASETS = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
                "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101")
DG_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")

for _spec in BENCHMARKS:
    register(_spec)

__all__ = ["BENCHMARKS", "B2N_DATASETS", "DG_TARGETS", "COOP_CFG_NAMES"]
