"""Build what `configs/debug.py` trains on: tiny frozen components and a small coloured-shapes dataset.

    python scripts/make_debug_assets.py --out runs/debug_assets --size 32

OUT/components holds the tiny T5 tokenizer and encoder, VAE and Qwen2.5-VL teacher (built once, then reused);
OUT/data holds a PNG of every scene of the shapes world, `t2i.jsonl` (one text-to-image record per scene) and
`edit.jsonl` (every recolouring of every scene), in the ShareGPT format of docs/METHOD.md section 7 with image paths
relative to the JSONL files. Running it again rewrites nothing that is already as it should be, so the data
index cached beside each JSONL file stays valid.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

from unialignment.toy.components import TinyComponentFolders, make_tiny_components
from unialignment.toy.folder import write_if_changed
from unialignment.toy.shapes import COLOURS, ShapeScene, all_scenes, draw_scene


@dataclass
class DebugAssets:
    components: TinyComponentFolders
    t2i: Path
    edit: Path
    images: int


def image_path(scene: ShapeScene) -> str:
    """The scene's image, relative to the data folder."""
    return f"images/{scene.colour}_{scene.shape}_{scene.position}.png"


def t2i_record(scene: ShapeScene) -> dict:
    return {"image": [image_path(scene)], "conversations": [_turn("human", scene.caption), _turn("gpt", "<image>")]}


def edit_record(source: ShapeScene, target: ShapeScene) -> dict:
    """Recolour `source` into `target`; conversations[0] describes the target, as edit records do."""
    return {
        "image": [image_path(source), image_path(target)],
        "conversations": [_turn("human", target.caption), _turn("gpt", "")],
        "instruction": f"Make the {target.shape} {target.colour}.",
    }


def make_debug_assets(out: Path, size: int = 32) -> DebugAssets:
    out = Path(out)
    components = make_tiny_components(out / "components")
    data = out / "data"
    scenes = all_scenes()
    for scene in scenes:
        png = io.BytesIO()
        draw_scene(scene, size).save(png, format="PNG")
        write_if_changed(data / image_path(scene), png.getvalue())

    edits = [
        edit_record(source, ShapeScene(colour, source.shape, source.position))
        for source in scenes
        for colour in COLOURS
        if colour != source.colour
    ]
    t2i, edit = data / "t2i.jsonl", data / "edit.jsonl"
    write_if_changed(t2i, _jsonl([t2i_record(scene) for scene in scenes]))
    write_if_changed(edit, _jsonl(edits))
    return DebugAssets(components, t2i, edit, images=len(scenes))


def _turn(speaker: str, text: str) -> dict:
    return {"from": speaker, "value": text}


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def main(argv: list[str] | None = None) -> DebugAssets:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/debug_assets"))
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error("--size must be positive")
    assets = make_debug_assets(args.out, args.size)
    print(f"components: {args.out / 'components'} (tokenizer, text_encoder, vae, teacher)")
    print(f"images:     {assets.images} PNGs of {args.size} px under {args.out / 'data' / 'images'}")
    for path in (assets.t2i, assets.edit):
        print(f"records:    {path} ({sum(1 for _ in path.open())} lines)")
    return assets


if __name__ == "__main__":
    main()
