"""SemGen-Bench's judge: the questions a VLM is asked about each output, in our own wording, and the reading of
its answers into semantic-consistency and perceptual-quality sub-scores (docs/METHOD.md section 8)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from unialignment.evaluation.semgen_bench import Sample

# --- the judge's questions and the reading of its answers -----------------------------------------------------------

# The judge's questions, in our own words. Each names its sub-scores and asks for them in a fixed JSON form, the
# reason first, so that the judge looks before it scores.
T2I_INTRO = "You are a strict judge of AI-generated images. This image was generated from the prompt:"
EDIT_INTRO = (
    "You are a strict judge of AI image editing. The first image is the original. The second image is the "
    "original edited by an AI model following the instruction:"
)
T2I_SC_ASKED = (
    (
        "elements",
        "every object, attribute, colour, count and piece of written text that the prompt names is there and correct "
        "(0 if the main subject is missing).",
    ),
    ("composition", "positions, relations, actions and the scene as a whole are as the prompt describes them."),
)
EDIT_SC_ASKED = (
    (
        "instruction",
        "every change the instruction asks for has been made, completely and in the right place (0 if none was).",
    ),
    (
        "preservation",
        "everything the instruction does not ask to change is as in the original (10 means no change that was not "
        "asked for).",
    ),
)
PQ_ASKED = (
    (
        "naturalness",
        "lighting, shadows, perspective and proportions hold together; it could be a real photograph or a deliberate "
        "piece of art.",
    ),
    (
        "artifacts",
        "free of distortion, malformed hands, faces or bodies, garbled lettering, smeared textures, noise and blur "
        "(10 means no flaw at all).",
    ),
)


def _question(intro: str, text: str, what: str, sc_parts: tuple, pq_title: str) -> str:
    def listed(parts: tuple) -> list[str]:
        return [f"- {name}: {meaning}" for name, meaning in parts]

    def names(parts: tuple) -> str:
        return ", ".join(f"<{name}>" for name, _ in parts)

    answer_form = (
        f'{{"reason": "<one or two sentences>", "semantic_consistency": [{names(sc_parts)}], '
        f'"perceptual_quality": [{names(PQ_ASKED)}]}}'
    )
    return "\n".join(
        [
            intro,
            "",
            f'"{text}"',
            "",
            f"Rate the {what} with {len(sc_parts) + len(PQ_ASKED)} whole numbers, each from 0 (worst) to 10 (best).",
            f"Semantic consistency, {len(sc_parts)} sub-scores:",
            *listed(sc_parts),
            f"{pq_title}, {len(PQ_ASKED)} sub-scores:",
            *listed(PQ_ASKED),
            "",
            "Answer with one JSON object and nothing else, in this form:",
            answer_form,
        ]
    )


# The prose reading takes at most as many numbers per group as the questions ask for.
SUBSCORES_PER_GROUP = max(len(parts) for parts in (T2I_SC_ASKED, EDIT_SC_ASKED, PQ_ASKED))
MIN_SCORE, MAX_SCORE = 0.0, 10.0
# Keys of the JSON answer, compared after `_normal_key`.
SC_KEYS = ("semantic_consistency", "sc", "semantic")
PQ_KEYS = ("perceptual_quality", "pq", "perceptual", "quality")
SC_PARTS = tuple(name for name, _ in T2I_SC_ASKED + EDIT_SC_ASKED)
PQ_PARTS = tuple(name for name, _ in PQ_ASKED)
# Labels of the prose reading.
TEXT_LABELS = {
    "sc": re.compile(r"semantic[\s_-]*consistency|\bsc\b", re.IGNORECASE),
    "pq": re.compile(r"perceptual[\s_-]*quality|\bpq\b", re.IGNORECASE),
}
# A number, with "/10" or "out of 10" after it swallowed; not the tail of a word, a date or a decimal.
NUMBER = re.compile(r"(?<![\w.-])(-?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*10(?:\.0+)?)?(?![\w.]*\d)", re.IGNORECASE)
LIST_MARKER = re.compile(r"^[ \t]*\d+[.)](?=\s)", re.MULTILINE)  # "1. elements: 7": the 1 is not a score
BLANK_LINE = re.compile(r"\n[ \t]*\n")
OPEN_BRACKET = re.compile(r"""[\s"':=]*\[""")


def judge_question(sample: Sample) -> str:
    """What the judge is asked about a sample (with the output image, and the source image first for an edit)."""
    if sample.is_edit:
        return _question(EDIT_INTRO, sample.text, "edit", EDIT_SC_ASKED, "Perceptual quality of the second image")
    return _question(T2I_INTRO, sample.text, "image", T2I_SC_ASKED, "Perceptual quality")


@dataclass(frozen=True)
class Scores:
    sc: float
    pq: float

    @property
    def overall(self) -> float:
        return math.sqrt(self.sc * self.pq)


def parse_scores(answer: str) -> Scores | None:
    """SC and PQ from a judge's answer, each the minimum of its sub-scores; None when the answer cannot be read.

    1. JSON: the first JSON value in the answer (text or code fences around it are ignored) that gives both
       groups. An object names them `semantic_consistency`/`sc` and `perceptual_quality`/`pq` (any case, spaces
       or underscores), each a number, a numeric string ("7/10"), a list of those or an object of named
       sub-scores; without group keys, the named sub-scores themselves count (elements, composition, instruction,
       preservation; naturalness, artifacts). A list of two lists is [SC sub-scores, PQ sub-scores].
    2. Prose, when no JSON value gives both groups: the numbers after a "semantic consistency"/"SC" label and
       after a "perceptual quality"/"PQ" label, up to the next label or a blank line: those inside a bracket that
       opens right after the label (an unclosed one, as in a cut-off answer, gives nothing), else the first
       `SUBSCORES_PER_GROUP`. The last label of a group with numbers counts, since the question asks for the
       reason first. "7/10" and "7 out of 10" are 7; "1." opening a line is a list marker, not a score.
    A sub-score outside [0, 10] makes the whole answer unreadable: the caller retries it; it is never clamped.
    """
    groups = _groups_from_json(answer)
    if groups is None:
        groups = _groups_from_text(answer)
    if groups is None:
        return None
    sc, pq = groups
    if not all(MIN_SCORE <= value <= MAX_SCORE for value in (*sc, *pq)):  # NaN fails too
        return None
    return Scores(min(sc), min(pq))


def _normal_key(key: str) -> str:
    return re.sub(r"[^a-z]+", "_", key.lower()).strip("_")


def _groups_from_json(answer: str) -> tuple[list[float], list[float]] | None:
    decoder = json.JSONDecoder()
    for opening in re.finditer(r"[{\[]", answer):
        try:
            value, _ = decoder.raw_decode(answer, opening.start())
        except json.JSONDecodeError:
            continue
        groups = _groups_from_value(value)
        if groups is not None:
            return groups
    return None


def _groups_from_value(value) -> tuple[list[float], list[float]] | None:
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(group, list) for group in value):
            sc, pq = _numbers_in(value[0]), _numbers_in(value[1])
            return (sc, pq) if sc and pq else None
        return None
    if not isinstance(value, dict):
        return None
    fields = {_normal_key(str(key)): field for key, field in value.items()}
    sc_field = next((fields[key] for key in SC_KEYS if key in fields), None)
    pq_field = next((fields[key] for key in PQ_KEYS if key in fields), None)
    if sc_field is None:
        sc_field = [fields[key] for key in SC_PARTS if key in fields] or None
    if pq_field is None:
        pq_field = [fields[key] for key in PQ_PARTS if key in fields] or None
    if sc_field is None or pq_field is None:
        return None
    sc, pq = _numbers_in(sc_field), _numbers_in(pq_field)
    return (sc, pq) if sc and pq else None


def _numbers_in(value) -> list[float] | None:
    """The sub-scores a JSON value holds; None if any part of it is not a score."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, str):
        return [float(match.group(1)) for match in NUMBER.finditer(value)] or None
    if isinstance(value, dict):
        # Named sub-scores; a text without numbers next to them (a "reason") is not one.
        value = [item for item in value.values() if not (isinstance(item, str) and not NUMBER.search(item))]
    if isinstance(value, list):
        parts = [_numbers_in(item) for item in value]
        if not parts or any(part is None for part in parts):
            return None
        return [number for part in parts for number in part]
    return None


def _groups_from_text(answer: str) -> tuple[list[float], list[float]] | None:
    # List markers become spaces, so that positions stay as they were.
    text = LIST_MARKER.sub(lambda marker: " " * len(marker.group()), answer)
    labels = sorted(
        (match.start(), match.end(), group)
        for group, pattern in TEXT_LABELS.items()
        for match in pattern.finditer(text)
    )
    found = {}
    for index, (_, end, group) in enumerate(labels):
        stop = labels[index + 1][0] if index + 1 < len(labels) else len(text)
        segment = BLANK_LINE.split(text[end:stop], maxsplit=1)[0]
        bracket = OPEN_BRACKET.match(segment)
        if bracket is not None:
            close = segment.find("]", bracket.end())
            numbers = [] if close < 0 else [float(m.group(1)) for m in NUMBER.finditer(segment, bracket.end(), close)]
        else:
            numbers = [float(match.group(1)) for match in NUMBER.finditer(segment)][:SUBSCORES_PER_GROUP]
        if numbers:
            found[group] = numbers  # a later label of the group replaces an earlier one
    if "sc" not in found or "pq" not in found:
        return None
    return found["sc"], found["pq"]
