"""Where a run's preference pairs come from, and whether they are on-policy.

DPO's loss is derived for pairs ``(y_w, y_l)`` sampled from the reference policy and labelled
by a preference (Rafailov et al., 2023, Section 4). Public datasets are usually *off-policy*:
Intel/orca_dpo_pairs holds GPT-4's answers as ``chosen`` and a weaker model's as ``rejected``,
neither written by the model being trained. The paper's advice for that case: when the model
that produced the pairs is not available, make the reference closer to their distribution by
first fine-tuning it on the chosen answers (SFT, "maximizing likelihood of preferred
completions"), then run DPO from there.

Which data a lesson trains on by default follows the preset (:func:`default_dataset`): the real
chat pairs on a GPU, the offline sentiment pairs on a CPU. :func:`describe_pairs` gives the one
sentence about their origin that the lessons print, true for every preset.
"""

from __future__ import annotations

from .data import ORCA_ID

GPU_PRESET_NAMES = ("t4", "a100", "cuda")  # the presets that train Mistral-7B in 4-bit


def default_dataset(preset) -> str:
    """``Intel/orca_dpo_pairs`` on the GPU presets (the course's headline run), ``"sentiment"`` elsewhere."""
    return ORCA_ID if preset.name in GPU_PRESET_NAMES else "sentiment"


def resolve_dataset(name: str, preset) -> str:
    """A lesson's ``DATASET`` parameter: ``"auto"`` means :func:`default_dataset`; anything else is kept."""
    return default_dataset(preset) if name == "auto" else name


def on_policy(preset, dataset: str) -> bool:
    """True when the pairs' completions were sampled from the reference this preset trains."""
    from .sentiment import pair_generator

    return dataset == "sentiment" and pair_generator(preset) == (preset.checkpoint or preset.model_name)


def shipped_note(preset) -> str:
    """A sentence when ``preset``'s pairs ship with the course (``sentiment.pairs_are_shipped``), else ""."""
    import json
    from importlib import resources

    from .sentiment import SHIPPED, pairs_are_shipped

    if not pairs_are_shipped(preset):
        return ""
    manifest = json.loads(resources.files("course_utils").joinpath(SHIPPED, "manifest.json").read_text())
    made = {(m["dtype"], m["machine"]["cpu_model"], m["machine"]["hardware_isa"]) for m in manifest.values()
            if m["seed"] == preset.seed and m["preset"] == preset.name}
    how = "; ".join(f"in {d} on an {cpu} ({isa.upper() if isa == 'amx' else isa})" for d, cpu, isa in sorted(made))
    return (f" For seed {preset.seed} they ship with the course (sampled once, {how}), so every CPU trains on "
            "these same pairs.")


def describe_pairs(preset, dataset: str) -> str:
    """One true sentence about where the pairs came from, for this preset and dataset."""
    from .sentiment import pair_generator

    model = preset.checkpoint or preset.model_name
    if dataset == "sentiment":
        generator = pair_generator(preset)
        where = "on the GPU" if preset.name in GPU_PRESET_NAMES else "on the CPU"
        if on_policy(preset, dataset):
            text = (f"On-policy pairs: {preset.samples_per_prompt} completions per opening were sampled {where} from "
                    f"{generator}, the very model this preset trains (the reference), then ranked by VADER.")
            return text + shipped_note(preset)
        return (f"Off-policy pairs: the completions were sampled from {generator}, not from this preset's model "
                f"({model}, random weights); that is enough to test the code path, which is all tiny is for.")
    if dataset.rstrip("/").endswith("orca_dpo_pairs"):
        return (f"Off-policy pairs: {dataset} holds GPT-4's answers as chosen and a weaker model's as rejected; "
                f"neither was sampled from {model}. The DPO paper's remedy: fine-tune on the chosen answers first.")
    return (f"Pairs from {dataset}: off-policy unless their completions were sampled from {model} itself; "
            "if they were not, consider fine-tuning on the chosen answers first (DPO paper, Section 4).")
