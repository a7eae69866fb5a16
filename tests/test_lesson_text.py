"""What the lessons' prose says about a preset is true of that preset. No notebook runs here.

The lessons run on every preset (``cpu``, ``tiny``, ``t4``, ``a100``), so a sentence that gives a preset a
precision or a source of preference pairs has to agree with ``course_utils/presets.py`` and
``course_utils/pair_origin.py``. The checker reads every markdown cell (and the string literals of code
cells, which the lessons print or display), splits it into sentences and clauses, and looks at each clause
that names a preset:

* **precision**: a dtype word (fp32/float32, bf16/bfloat16, fp16/float16) is given to the preset named
  next to it (to its right first: "fp16 on a T4"; else to its left: "SmolLM2 in fp32"). It must be a
  precision that preset trains in (:data:`FACTS`, from ``precision.training_dtype``). Where that depends on
  the machine (the ``cpu`` preset: bf16 autocast where the CPU multiplies bf16 natively, fp32 elsewhere),
  the sentence has to say so: name both, or say "native". A clause about stored weights (weights, base,
  merge, load, ...) is not about the training precision, and "no bf16", "than fp32" are not claims.
* **pair origin**: a clause saying pairs were "sampled from the reference" must name only presets whose
  pairs are on-policy (``pair_origin.on_policy``: not ``tiny``); without any preset it is a claim about
  every preset, which is false, unless it is about the theory (the loss is "derived"/"assumes" it, an "Eq.").

4-bit words are not checked: the lessons rightly run NF4 demos on a CPU. The last tests feed the checker
sentences the lessons used to contain, to show that it catches them.
"""

from __future__ import annotations

import ast
import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

from course_utils.pair_origin import on_policy
from course_utils.precision import DTYPE_WORDS, describe_training, training_dtype
from course_utils.presets import get_preset

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PRESET_NAMES = ("cpu", "tiny", "t4", "a100")
GPU_NAMES = ("t4", "a100")


def facts(name: str) -> dict:
    """What a preset trains in on the runtime it is for, and whether its sentiment pairs are on-policy."""
    preset = get_preset(name)
    on_gpu = name in GPU_NAMES
    compute = {DTYPE_WORDS[training_dtype(preset, on_gpu, native)] for native in (True, False)}
    return {"compute": compute, "on_policy": on_policy(preset, "sentiment")}


FACTS = {name: facts(name) for name in PRESET_NAMES}

# How the prose names a preset. A model name stands for the preset that trains it.
ALIASES = [
    (r"`cpu`|\bcpu preset\b|\bCPU preset\b(?!s)|\bon (?:a|the) CPU\b|\bSmolLM2\b", ("cpu",)),
    (r"\bCPU presets\b", ("cpu", "tiny")),
    (r"`tiny`|\btiny (?:preset|model|run)\b", ("tiny",)),
    (r"\bt4\b|\bT4\b|\bTuring\b", ("t4",)),
    (r"\ba100\b|\bA100\b|\bH100\b|\bAmpere\b", ("a100",)),
    (r"\bGPU presets?\b|\bon (?:a|the) GPU\b|\bMistral(?:-7B)?\b", GPU_NAMES),
]
DTYPES = [(r"(?<![-\w])(?:fp32|float32)\b", "fp32"), (r"(?<![-\w])(?:bf16|bfloat16)\b", "bf16"),
          (r"(?<![-\w])(?:fp16|float16)\b", "fp16")]
NOT_A_CLAIM = re.compile(r"\b(?:no|not|never|without|than|instead of)\s+(?:\*\*)?$", re.I)  # "no bf16", "than fp32"
WEIGHTS = re.compile(r"\b(?:weights?|base|merg\w*|load\w*|stored|stores|original|copy|reward model|adapters?|scales?)\b",
                     re.I)
ORIGIN = re.compile(r"sampled from (?:the reference|pi_ref|π_ref)|from the reference itself", re.I)
THEORY = re.compile(r"\bderived\b|\bassum\w*|\bEq\.", re.I)
RIGHT_REACH = 40  # characters: "fp16 on a T4" gives fp16 to the T4 named after it


def sentences(text: str) -> list[str]:
    """Sentences of a markdown cell: paragraphs, headings, list items and table rows apart, lines joined."""
    text = re.sub(r"\*\*|__", "", text)  # bold does not change what is said
    out = []
    for block in re.split(r"\n\s*\n|\n(?=\s*(?:#|[-*] |\d+\. |\|))", text):
        block = re.sub(r"\s+", " ", block).strip()
        out += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", block) if s]
    return out


def mentions(text: str, patterns) -> list[tuple[int, int, tuple]]:
    return sorted((m.start(), m.end(), value) for pattern, value in patterns for m in re.finditer(pattern, text))


def owner(presets, start: int, end: int):
    """The preset mention a dtype word at [start, end) belongs to: the next one to its right, else the nearest left."""
    right = [p for p in presets if p[0] >= end and p[0] - end <= RIGHT_REACH]
    if right:
        return right[0][2]
    left = [p for p in presets if p[1] <= start]
    return left[-1][2] if left else None


def check_text(text: str) -> list[str]:
    """Findings: sentences of ``text`` that state a precision or a pair origin a preset does not have."""
    found = []
    for sentence in sentences(text):
        for clause in re.split(r"[;:]", sentence):
            presets = mentions(clause, ALIASES)
            for start, end, dtype in mentions(clause, DTYPES):
                if NOT_A_CLAIM.search(clause[:start]):
                    continue
                if WEIGHTS.search(clause):
                    continue  # how weights are stored, loaded or merged: a choice (MERGE_DTYPE), not the training precision
                for name in owner(presets, start, end) or ():
                    fact = FACTS[name]
                    if dtype not in fact["compute"]:
                        found.append(f"{name} does not train in {dtype}: {sentence!r}")
                    elif len(fact["compute"]) > 1 and not (
                            all(re.search(p, sentence) for p, d in DTYPES if d in fact["compute"])
                            or re.search(r"\bnative", sentence, re.I)):
                        found.append(f"{name} trains in {' or '.join(sorted(fact['compute']))} depending on the CPU; "
                                     f"the sentence gives only {dtype}: {sentence!r}")
        for clause in re.split(r"[,;:]", sentence):
            if not ORIGIN.search(clause):
                continue
            names = {n for _, _, value in mentions(clause, ALIASES) for n in value}
            if not names and not THEORY.search(sentence):
                found.append(f"pairs sampled from the reference on every preset (not on tiny): {sentence!r}")
            found += [f"{n}'s pairs are not sampled from the model it trains: {sentence!r}"
                      for n in sorted(names) if not FACTS[n]["on_policy"]]
    return found


def code_strings(source: str) -> list[str]:
    """String literals of a code cell (what it prints or displays); IPython's ! and % lines are dropped."""
    code = "\n".join("" if line.lstrip().startswith(("!", "%")) else line for line in source.splitlines())
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


@lru_cache(maxsize=None)
def lesson_texts(path: Path) -> tuple[tuple[int, str], ...]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    out = []
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            out.append((i, source))
        elif cell["cell_type"] == "code":
            out += [(i, s) for s in code_strings(source)]
    return tuple(out)


def all_text() -> str:
    return "\n".join(text for path in NOTEBOOKS for _, text in lesson_texts(path))


def test_the_lessons_are_read():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]
    assert all(any(i for i, _ in lesson_texts(p)) for p in NOTEBOOKS)


def test_facts_follow_the_presets():
    # The table the checker compares with, spelled out: if a preset changes, this says what the prose must follow.
    assert FACTS["cpu"]["compute"] == {"bf16", "fp32"}
    assert FACTS["tiny"]["compute"] == {"fp32"}
    assert FACTS["t4"]["compute"] == {"fp16"} and FACTS["a100"]["compute"] == {"bf16"}
    assert FACTS["cpu"]["on_policy"] and FACTS["t4"]["on_policy"] and not FACTS["tiny"]["on_policy"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_no_sentence_contradicts_the_presets(path):
    found = [f"cell {i}: {f}" for i, text in lesson_texts(path) for f in check_text(text)]
    assert not found, "\n".join(found)


# --- the sentences this test was written for: gone, and caught if they come back ----------------------------

OLD_SENTENCES = [  # as the lessons stated them; each was false on at least one preset
    # lesson 1, section 1: the cpu preset's DPO training runs in bf16 autocast where the CPU has native bf16
    "One dataclass (`course_utils/presets.py`) says what this runtime can afford: SmolLM2-135M-Instruct in fp32 on "
    "a CPU,\nMistral-7B in 4-bit on a GPU, and `tiny`, a random two-layer model that proves the code path in CI and "
    "nothing else.",
    # lesson 4, section 1
    "One dataclass says how to train here. On a GPU it picks Mistral-7B in 4-bit (QLoRA); on a\nCPU, "
    "SmolLM2-135M-Instruct in fp32 with plain LoRA; `tiny` is CI's random two-layer model,\nwhich proves the code "
    "path and nothing else.",
    # lesson 3, section 3: true of cpu and the GPU presets, not of tiny
    "2. **completions**: `samples_per_prompt` answers per prompt, sampled from the reference policy, the model the "
    "preset\n   trains: SmolLM2-135M-Instruct on `cpu`, Mistral-7B in 4-bit on the GPU presets (sampled on the GPU).",
]


@pytest.mark.parametrize("text", OLD_SENTENCES, ids=["lesson1-cpu-fp32", "lesson4-cpu-fp32", "lesson3-reference"])
def test_the_checker_catches_the_old_sentences(text):
    assert check_text(text)


@pytest.mark.parametrize("text", [
    "The tiny preset's pairs were sampled from the reference.",  # tiny's come from SmolLM2
    "Why bf16 on a T4?",  # a T4 has no bf16
    "On the a100 preset, DPO trains in fp16.",
    "On the cpu preset DPO trains in bf16 autocast.",  # only where the CPU has native bf16
])
def test_the_checker_catches_other_false_sentences(text):
    assert check_text(text)


@pytest.mark.parametrize("text", [
    "Why fp16 on a T4 but bf16 on an A100?",
    "**fp16 on a T4** (Turing has no bf16), **bf16 on Ampere+**",
    "So the CPU preset trains SmolLM2 in bf16 autocast where the CPU multiplies bf16 natively (fp32 elsewhere).",
    "The `cpu` and `tiny` presets train on an fp32 base, so there was nothing to dequantise.",
    "On `cpu` and the GPU presets they come from the reference itself, on `tiny` from SmolLM2.",
    "DPO's loss (Eq. 7) is derived for pairs whose answers were sampled from the reference.",
])
def test_the_checker_passes_true_sentences(text):
    assert check_text(text) == []


def test_the_old_false_sentences_are_gone():
    text = re.sub(r"\s+", " ", all_text())
    # lesson 2: the weight sigma(-beta * margin) is at most 1/2 on a pair ranked right; near 1/2 for a small beta
    assert "near 1 over a wide range of margins" not in text
    assert "near 1/2 over a wide range of margins" in text
    # the cpu preset trains in bf16 autocast where the CPU supports it, not "in fp32"
    assert not re.search(r"SmolLM2[-\w]* in fp32", text)
    assert not re.search(r"bf16[^.]*only on Ampere", text)
    # tiny's pairs are sampled from SmolLM2, not from the model tiny trains
    assert "sampled from the reference policy" not in text


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_the_printed_precision_agrees_with_the_facts(name):
    # lesson 4 prints describe_training instead of stating the precision by hand
    preset, on_gpu = get_preset(name), name in GPU_NAMES
    for native in (True, False):
        line = describe_training(preset, on_gpu, native)
        assert DTYPE_WORDS[training_dtype(preset, on_gpu, native)] in line and check_text(line) == []
