"""Write the shapes world (the built-in small default's data) in the JSONL formats of docs/METHOD.md section 7.

    python scripts/make_toy_world.py --out runs/toy/world [--size 64] [--seed 0]

OUT/train/ and OUT/heldout/ each hold `t2i.jsonl` (prompt -> image; its caption is also the captioning
target), `edit.jsonl` (recolour, move, add, remove), `perception.jsonl` (mask and edge maps), `composition.jsonl`
(two sources -> one picture) and `vqa.jsonl` (question -> one-word or one-phrase answer), image paths relative to
OUT. Every image of the held-out split that shows an object shows one of `heldout_triples()`, a colour-shape-
position combination that no training image of any task shows. Images are drawn once under OUT/images/ and
re-runs leave unchanged files alone, so the data index cached beside each JSONL file stays valid.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections import Counter
from pathlib import Path

from unialignment.toy.folder import write_if_changed
from unialignment.toy.world import (
    COLOURS,
    OPPOSITE,
    PHRASES,
    POSITIONS,
    SHAPES,
    SIDE_POSITIONS,
    SIZES,
    Scene,
    ShapeObject,
    draw_edges,
    draw_mask,
    draw_scene,
    heldout_triples,
    is_heldout,
)

TASK_FILES = ("t2i", "edit", "perception", "composition", "vqa")
JITTER_SEEDS = 4  # drawings of each one-object training description
TWO_OBJECT_SCENES = 400  # two-object training scenes (the subjects of add, remove and composition)
EDITS_PER_KIND = 600  # training records of each edit kind
MOVE_PHRASES = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom"}
MOVE_PHRASES["middle"] = "to the middle"


class ToyWorldWriter:
    """Draws each (scene, jitter, rendering) once and writes records that point at the drawings."""

    def __init__(self, out: Path, side: int):
        self.out, self.side = out, side
        self.drawn: set[str] = set()

    def image(self, scene: Scene, seed: int, kind: str = "rgb") -> str:
        path = f"images/{kind}/{scene.name}__{seed}.png"
        if path not in self.drawn:
            draw = {"rgb": draw_scene, "mask": draw_mask, "edges": draw_edges}[kind]
            png = io.BytesIO()
            draw(scene, self.side, seed).save(png, format="PNG")
            write_if_changed(self.out / path, png.getvalue())
            self.drawn.add(path)
        return path


def _turns(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def t2i_record(writer: ToyWorldWriter, scene: Scene, seed: int) -> dict:
    return {"image": [writer.image(scene, seed)], "conversations": _turns(scene.caption, "<image>")}


def edit_record(writer: ToyWorldWriter, source: Scene, target: Scene, seed: int, instruction: str) -> dict:
    return {
        "image": [writer.image(source, seed), writer.image(target, seed)],
        "conversations": _turns(target.caption, ""),
        "instruction": instruction,
    }


def perception_record(writer: ToyWorldWriter, scene: Scene, seed: int, kind: str) -> dict:
    instruction = {"mask": "Show the mask of the shapes.", "edges": "Draw the edges of the shapes."}[kind]
    return {
        "image": [writer.image(scene, seed), writer.image(scene, seed, kind)],
        "conversations": _turns(f"the {kind} of {scene.caption}", ""),
        "instruction": instruction,
    }


def composition_record(writer: ToyWorldWriter, first: Scene, second: Scene, seed: int) -> dict:
    a, b = first.objects[0], second.objects[0]
    target = Scene((a, b))
    return {
        "image": [writer.image(first, seed), writer.image(second, seed), writer.image(target, seed)],
        "conversations": _turns(target.caption, ""),
        "instruction": f"Put the {a.colour} {a.shape} and the {b.colour} {b.shape} in one picture.",
    }


def vqa_records(writer: ToyWorldWriter, scene: Scene, seed: int) -> list[dict]:
    """Three questions about a one-object scene: its colour, its shape, its place."""
    (obj,) = scene.objects
    image = writer.image(scene, seed)
    questions = [
        (f"What colour is the {obj.shape}?", obj.colour),
        (f"What shape is {PHRASES[obj.position]}?", obj.shape),
        (f"Where is the {obj.colour} {obj.shape}?", PHRASES[obj.position]),
    ]
    return [{"image": [image], "conversations": _turns(f"<image>\n{q}", a)} for q, a in questions]


def one_object_scenes(keep) -> list[Scene]:
    scenes = []
    for colour in COLOURS:
        for shape in SHAPES:
            for position in POSITIONS:
                for size in SIZES:
                    scene = Scene((ShapeObject(colour, shape, position, size),))
                    if keep(scene):
                        scenes.append(scene)
    return scenes


def two_object_scene(rng: random.Random, keep, first: ShapeObject | None = None) -> Scene:
    """Two objects of different colours at opposite side positions, the scene passing `keep`."""
    while True:
        a = first or ShapeObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIDE_POSITIONS))
        a = ShapeObject(a.colour, a.shape, a.position, a.size if first else rng.choice(list(SIZES)))
        colour = rng.choice([c for c in COLOURS if c != a.colour])
        position = OPPOSITE[a.position]
        b = ShapeObject(colour, rng.choice(SHAPES), position, rng.choice(list(SIZES)))
        scene = Scene((a, b))
        if keep(scene):
            return scene


def split_records(writer: ToyWorldWriter, heldout: bool, rng: random.Random) -> dict[str, list[dict]]:
    held = heldout_triples()
    in_split = (lambda s: is_heldout(s, held)) if heldout else (lambda s: not is_heldout(s, held))
    train_only = lambda s: not is_heldout(s, held)  # noqa: E731 - sources of held-out edits may be training scenes
    records: dict[str, list[dict]] = {name: [] for name in TASK_FILES}
    singles = one_object_scenes(in_split)
    seeds = [0] if heldout else list(range(JITTER_SEEDS))

    for scene in singles:
        for seed in seeds:
            records["t2i"].append(t2i_record(writer, scene, seed))
            records["vqa"].extend(vqa_records(writer, scene, seed))
            for kind in ("mask", "edges"):
                records["perception"].append(perception_record(writer, scene, seed, kind))

    # Edits: the target always lies in the split; the source may be any scene the split allows as a source.
    source_ok = (lambda s: True) if heldout else train_only
    edits = records["edit"]
    for scene in singles:
        (obj,) = scene.objects
        seed = rng.choice(seeds)
        for colour in rng.sample([c for c in COLOURS if c != obj.colour], k=2 if heldout else 5):
            source = scene.replace(0, colour=colour)
            if source_ok(source):
                edits.append(edit_record(writer, source, scene, seed, f"Make the {obj.shape} {obj.colour}."))
        for position in rng.sample([p for p in POSITIONS if p != obj.position], k=1 if heldout else 4):
            source = scene.replace(0, position=position)
            if source_ok(source):
                instruction = f"Move the {obj.shape} {MOVE_PHRASES[obj.position]}."
                edits.append(edit_record(writer, source, scene, seed, instruction))

    # Two-object scenes: add (one -> two), remove (two -> one), composition (two sources -> two).
    count = len(singles) if heldout else TWO_OBJECT_SCENES
    for _ in range(count):
        if heldout:  # the added / kept object is the held-out one
            first = rng.choice([s for s in singles if s.objects[0].position in SIDE_POSITIONS]).objects[0]
            scene = two_object_scene(rng, lambda s: not is_heldout(Scene(s.objects[1:]), held), first)
        else:
            scene = two_object_scene(rng, in_split)
        a, b = scene.objects
        seed = rng.choice(seeds)
        if not heldout:  # held-out text-to-image stays one object per prompt
            records["t2i"].append(t2i_record(writer, scene, seed))
        kept, other = Scene((a,)), Scene((b,))
        if heldout:
            # add the held-out object to a training scene; remove the training object from a held-out scene
            added = Scene((b, a))
            edits.append(edit_record(writer, other, added, seed, f"Add {a.phrase}."))
            edits.append(edit_record(writer, scene, kept, seed, f"Remove the {b.colour} {b.shape}."))
        else:
            edits.append(edit_record(writer, kept, scene, seed, f"Add {b.phrase}."))
            edits.append(edit_record(writer, scene, kept, seed, f"Remove the {b.colour} {b.shape}."))
        records["composition"].append(composition_record(writer, kept, other, seed))

    if not heldout and len(edits) > 4 * EDITS_PER_KIND:
        rng.shuffle(edits)
        del edits[4 * EDITS_PER_KIND :]
    return records


def make_toy_world(out: Path, side: int = 64, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write both splits under `out`; returns the record count per split and task."""
    out = Path(out)
    writer = ToyWorldWriter(out, side)
    counts = {}
    for split in ("train", "heldout"):
        rng = random.Random(f"{seed}-{split}")
        records = split_records(writer, split == "heldout", rng)
        for task, rows in records.items():
            write_if_changed(out / split / f"{task}.jsonl", _jsonl(rows, prefix="../"))
        counts[split] = {task: len(rows) for task, rows in records.items()}
    return counts


def _jsonl(records: list[dict], prefix: str) -> bytes:
    lines = []
    for record in records:
        record = {**record, "image": [prefix + path for path in record["image"]]}
        lines.append(json.dumps(record) + "\n")
    return "".join(lines).encode()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/toy/world"))
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (at least 48)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 48:
        parser.error("--size must be at least 48: below it small triangles and circles are not told apart")
    counts = make_toy_world(args.out, args.size, args.seed)
    for split, per_task in counts.items():
        listed = ", ".join(f"{task} {n}" for task, n in per_task.items())
        print(f"{split}: {listed} records under {args.out / split}")
    images = Counter(path.parent.name for path in (args.out / "images").rglob("*.png"))
    print(f"images: {sum(images.values())} PNGs of {args.size} px under {args.out / 'images'}")
    return counts


if __name__ == "__main__":
    main()
