"""Write the example DAGs' sample prompt tables, deterministically (``python dags/data/make_sample_data.py``).

What it writes, next to this file:

- ``catalog/catalog.parquet``: 40 catalog products for ``imagen_catalog_nightly``. Columns ``prompt_id``
  (the SKU), ``title``, ``category``, ``locale``, ``prompt`` and ``surfaces``: the list of storefront
  surfaces each product needs an image for. The DAG maps surfaces to ratios (grid tile 1:1, hero 16:9,
  mobile banner 9:16, product page 3:4, lookbook 4:3), so every ratio is used. Six prompts are Chinese.
  One product is a "replica" handbag: the demo and the tests configure the emulator to moderate that word
  (:data:`MODERATED_WORDS`), the way a real content policy refuses counterfeit goods.
- ``prompt_dataset/ds=YYYY-MM-DD/part-000.parquet``: three daily partitions of six prompts each for
  ``imagen_prompt_backfill`` (columns ``prompt_id``, ``prompt``, ``size``, ``source``).

The committed files are the output of this script; a test checks they still match it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import pandas as pd

HERE: Final = Path(__file__).resolve().parent
CATALOG: Final = HERE / "catalog" / "catalog.parquet"
DATASET: Final = HERE / "prompt_dataset"
#: Dates of the backfill dataset's partitions.
DATES: Final = ("2026-01-01", "2026-01-02", "2026-01-03")
#: What the demo's and the tests' emulator moderates: its usual marker, and the word in one product.
MODERATED_WORDS: Final = ("[[moderate]]", "replica")

_STYLE: Final = "studio product photography, soft diffused light, clean background, high detail"

# (sku, title, category, locale, prompt, surfaces)
_PRODUCTS: Final[tuple[tuple[str, str, str, str, str, tuple[str, ...]], ...]] = (
    (
        "SKU-1001",
        "Stoneware teapot",
        "kitchen",
        "en",
        "A speckled stoneware teapot on a linen tablecloth, morning light",
        ("grid_tile", "hero", "pdp_portrait"),
    ),
    (
        "SKU-1002",
        "Copper saucepan",
        "kitchen",
        "en",
        "A hammered copper saucepan on a marble counter",
        ("grid_tile", "lookbook"),
    ),
    (
        "SKU-1003",
        "Chef's knife",
        "kitchen",
        "en",
        "A Damascus steel chef's knife on an oak cutting board",
        ("grid_tile", "hero"),
    ),
    (
        "SKU-1004",
        "Pour-over coffee set",
        "kitchen",
        "en",
        "A glass pour-over coffee set with a gooseneck kettle, steam rising",
        ("grid_tile", "mobile_banner"),
    ),
    (
        "SKU-1005",
        "Cast iron skillet",
        "kitchen",
        "en",
        "A cast iron skillet with seared vegetables, rustic wooden table",
        ("grid_tile", "hero", "lookbook"),
    ),
    (
        "SKU-1006",
        "青花瓷碗",
        "kitchen",
        "zh",
        "一只青花瓷碗放在竹席上，柔和的自然光，产品摄影",
        ("grid_tile", "pdp_portrait"),
    ),
    (
        "SKU-1007",
        "Walnut lounge chair",
        "furniture",
        "en",
        "A mid-century walnut lounge chair with cognac leather cushions",
        ("grid_tile", "hero", "pdp_portrait"),
    ),
    (
        "SKU-1008",
        "Linen sofa",
        "furniture",
        "en",
        "A three-seat oatmeal linen sofa in a sunlit living room",
        ("hero", "lookbook"),
    ),
    (
        "SKU-1009",
        "Oak dining table",
        "furniture",
        "en",
        "A solid oak dining table set for six, Scandinavian interior",
        ("grid_tile", "hero"),
    ),
    (
        "SKU-1010",
        "Rattan pendant lamp",
        "furniture",
        "en",
        "A woven rattan pendant lamp glowing above a kitchen island",
        ("grid_tile", "mobile_banner"),
    ),
    (
        "SKU-1011",
        "实木书架",
        "furniture",
        "zh",
        "一个胡桃木书架，摆满书籍和绿植，温暖的室内光线",
        ("grid_tile", "pdp_portrait", "mobile_banner"),
    ),
    (
        "SKU-1012",
        "Velvet armchair",
        "furniture",
        "en",
        "An emerald velvet armchair with brass legs, art deco room",
        ("grid_tile", "lookbook"),
    ),
    (
        "SKU-1013",
        "Merino crewneck",
        "apparel",
        "en",
        "A folded charcoal merino crewneck sweater on a wooden shelf",
        ("grid_tile", "pdp_portrait"),
    ),
    (
        "SKU-1014",
        "Waxed canvas jacket",
        "apparel",
        "en",
        "A waxed canvas field jacket on a model walking through autumn woods",
        ("hero", "mobile_banner", "pdp_portrait"),
    ),
    (
        "SKU-1015",
        "Leather sneakers",
        "apparel",
        "en",
        "White leather low-top sneakers on a concrete step",
        ("grid_tile", "hero"),
    ),
    (
        "SKU-1016",
        "Silk scarf",
        "apparel",
        "en",
        "A hand-rolled silk scarf with a botanical print, draped over a chair",
        ("grid_tile", "lookbook"),
    ),
    (
        "SKU-1017",
        "真丝旗袍",
        "apparel",
        "zh",
        "一件墨绿色真丝旗袍挂在古典木门前，电影感光线",
        ("pdp_portrait", "mobile_banner"),
    ),
    (
        "SKU-1018",
        "Wool fedora",
        "apparel",
        "en",
        "A grey wool fedora hat on a hat stand, soft shadows",
        ("grid_tile",),
    ),
    (
        "SKU-1019",
        "Denim overshirt",
        "apparel",
        "en",
        "A raw selvedge denim overshirt on a hanger against a brick wall",
        ("grid_tile", "pdp_portrait"),
    ),
    (
        "SKU-1020",
        "Trail running shoes",
        "outdoor",
        "en",
        "Trail running shoes splashing through a mountain stream",
        ("grid_tile", "hero", "mobile_banner"),
    ),
    (
        "SKU-1021",
        "Ultralight tent",
        "outdoor",
        "en",
        "An ultralight two-person tent on an alpine ridge at sunrise",
        ("hero", "lookbook"),
    ),
    (
        "SKU-1022",
        "Insulated bottle",
        "outdoor",
        "en",
        "A matte green insulated water bottle on a granite boulder",
        ("grid_tile", "pdp_portrait"),
    ),
    (
        "SKU-1023",
        "Hiking backpack",
        "outdoor",
        "en",
        "A 40 litre hiking backpack leaning on a trail marker, pine forest",
        ("grid_tile", "hero"),
    ),
    (
        "SKU-1024",
        "登山杖",
        "outdoor",
        "zh",
        "一对碳纤维登山杖靠在山顶的岩石上，云海背景",
        ("grid_tile", "mobile_banner"),
    ),
    (
        "SKU-1025",
        "Camp stove",
        "outdoor",
        "en",
        "A compact camp stove boiling water beside a lake at dusk",
        ("grid_tile", "lookbook"),
    ),
    (
        "SKU-1026",
        "Wireless headphones",
        "electronics",
        "en",
        "Matte black over-ear wireless headphones on a walnut desk",
        ("grid_tile", "hero", "pdp_portrait"),
    ),
    (
        "SKU-1027",
        "Mechanical keyboard",
        "electronics",
        "en",
        "A mechanical keyboard with cream keycaps, warm desk lamp light",
        ("grid_tile", "hero"),
    ),
    (
        "SKU-1028",
        "Smart speaker",
        "electronics",
        "en",
        "A fabric-covered smart speaker on a bookshelf",
        ("grid_tile", "lookbook"),
    ),
    (
        "SKU-1029",
        "Instant camera",
        "electronics",
        "en",
        "A pastel instant camera with a few printed photos scattered around",
        ("grid_tile", "mobile_banner"),
    ),
    (
        "SKU-1030",
        "无线充电器",
        "electronics",
        "zh",
        "一个极简风格的无线充电板，上面放着手机，柔和的顶光",
        ("grid_tile", "pdp_portrait"),
    ),
    (
        "SKU-1031",
        "Designer-style handbag",
        "accessories",
        "en",
        "A replica designer handbag in quilted leather with a gold chain strap",
        ("grid_tile", "pdp_portrait"),
    ),
    (
        "SKU-1032",
        "Leather wallet",
        "accessories",
        "en",
        "A slim vegetable-tanned leather wallet on a slate surface",
        ("grid_tile",),
    ),
    (
        "SKU-1033",
        "Automatic watch",
        "accessories",
        "en",
        "An automatic steel watch with a blue sunburst dial, macro shot",
        ("grid_tile", "hero", "pdp_portrait"),
    ),
    (
        "SKU-1034",
        "Sunglasses",
        "accessories",
        "en",
        "Tortoiseshell sunglasses on a sandy beach towel",
        ("grid_tile", "lookbook"),
    ),
    (
        "SKU-1035",
        "Ceramic vase",
        "home",
        "en",
        "A tall matte white ceramic vase with dried pampas grass",
        ("grid_tile", "pdp_portrait"),
    ),
    (
        "SKU-1036",
        "Wool throw blanket",
        "home",
        "en",
        "A chunky knit wool throw blanket on a reading nook bench",
        ("grid_tile", "hero"),
    ),
    (
        "SKU-1037",
        "Scented candle",
        "home",
        "en",
        "A soy scented candle in an amber glass jar, flickering flame",
        ("grid_tile", "mobile_banner"),
    ),
    (
        "SKU-1038",
        "手工茶具",
        "home",
        "zh",
        "一套手工紫砂茶具摆在茶台上，窗外竹影",
        ("grid_tile", "hero", "lookbook"),
    ),
    (
        "SKU-1039",
        "Linen bedding set",
        "home",
        "en",
        "A washed linen bedding set in sage green, morning light through curtains",
        ("hero", "pdp_portrait"),
    ),
    (
        "SKU-1040",
        "Terracotta planter",
        "home",
        "en",
        "A terracotta planter with a fiddle-leaf fig in a bright corner",
        ("grid_tile", "lookbook"),
    ),
)

# (prompt_id, prompt, size), per date of the backfill dataset.
_DAYS: Final[dict[str, tuple[tuple[str, str, str], ...]]] = {
    "2026-01-01": (
        ("q-0001", "A lighthouse on a cliff during a winter storm, oil painting", "16:9"),
        ("q-0002", "A red fox curled up in fresh snow, wildlife photography", "4:3"),
        ("q-0003", "元旦的烟花在城市天际线上绽放，夜景摄影", "16:9"),
        ("q-0004", "A cup of hot chocolate with marshmallows, cozy cabin", "1:1"),
        ("q-0005", "A frozen lake with ice skaters at dusk, watercolor", "3:4"),
        ("q-0006", "A vintage train crossing a snowy viaduct", "9:16"),
    ),
    "2026-01-02": (
        ("q-0007", "A bustling night market with lanterns, street photography", "16:9"),
        ("q-0008", "A robot gardener tending bonsai trees, isometric illustration", "1:1"),
        ("q-0009", "一只熊猫在竹林里吃竹子，水墨画风格", "3:4"),
        ("q-0010", "A sailboat on a calm sea under a pastel sunrise", "4:3"),
        ("q-0011", "A cozy library with a spiral staircase, warm light", "9:16"),
        ("q-0012", "A bowl of ramen with a soft-boiled egg, overhead shot", "1:1"),
    ),
    "2026-01-03": (
        ("q-0013", "A desert canyon at golden hour, drone photography", "16:9"),
        ("q-0014", "An astronaut reading a newspaper on the moon, retro poster", "3:4"),
        ("q-0015", "春节的红灯笼挂满古镇街道，傍晚", "9:16"),
        ("q-0016", "A hummingbird drinking from a hibiscus flower, macro", "4:3"),
        ("q-0017", "A minimalist Japanese garden with raked gravel", "1:1"),
        ("q-0018", "A steam locomotive in a misty mountain valley", "16:9"),
    ),
}


def catalog_frame() -> pd.DataFrame:
    """Return the catalog table."""
    columns: dict[str, list[Any]] = {
        k: [] for k in ("prompt_id", "title", "category", "locale", "prompt", "surfaces")
    }
    for sku, title, category, locale, prompt, surfaces in _PRODUCTS:
        text = prompt if locale == "zh" else f"{prompt}, {_STYLE}"
        for key, value in zip(columns, (sku, title, category, locale, text, list(surfaces)), strict=True):
            columns[key].append(value)
    return pd.DataFrame(columns)


def partition_frame(date: str) -> pd.DataFrame:
    """Return the backfill dataset's partition of ``date``."""
    rows = _DAYS[date]
    return pd.DataFrame(
        {
            "prompt_id": [r[0] for r in rows],
            "prompt": [r[1] for r in rows],
            "size": [r[2] for r in rows],
            "source": ["daily-prompts"] * len(rows),
        }
    )


def write_all(root: Path = HERE) -> list[Path]:
    """Write every sample table under ``root`` (default: beside this file); return their paths."""
    written = []
    catalog = root / CATALOG.relative_to(HERE)
    catalog.parent.mkdir(parents=True, exist_ok=True)
    catalog_frame().to_parquet(catalog, index=False)
    written.append(catalog)
    for date in DATES:
        path = root / DATASET.relative_to(HERE) / f"ds={date}" / "part-000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        partition_frame(date).to_parquet(path, index=False)
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_all():
        print(written_path)
