"""python -m course_utils.evaluate: policy vs reference by a judge, and clean refusals of bad input (tiny model)."""

import json
import subprocess
import sys

import pytest

from course_utils.evaluate_cli import main


@pytest.fixture(scope="module")
def untrained_adapter(tmp_path_factory):
    """A fresh LoRA adapter on the tiny model, saved as lesson 4 saves one (adapter/ beside preset.json).

    LoRA's B starts at 0, so policy and reference are the same model: with the same seed they must write the
    same answers, and every verdict must be a tie.
    """
    import dataclasses

    from peft import get_peft_model

    from course_utils.models import load_model, lora_config
    from course_utils.presets import get_preset

    root = tmp_path_factory.mktemp("run") / "dpo"
    model, tokenizer = load_model("tiny", seed=0)
    get_peft_model(model, lora_config(r=4, alpha=8, dropout=0.0)).save_pretrained(root / "adapter")
    (root / "preset.json").write_text(json.dumps(dataclasses.asdict(get_preset("tiny"))))
    return root / "adapter"


def test_cli_scores_policy_against_reference(untrained_adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say something kind."}\n"What is 2 plus 2?"\n')
    out = tmp_path / "eval.json"
    code = main(["--adapter", str(untrained_adapter), "--prompts", str(prompts), "--judge", "reward-model=tiny-random",
                 "--samples", "2", "--max-new-tokens", "6", "--out", str(out)])
    assert code == 0 and "policy wins 50.0%" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["n"] == 4 and report["ties"] == 4 and report["win_rate"] == 0.5  # adapter off == adapter on
    assert report["ci"] == [0.5, 0.5] and report["base"] == "tiny"
    pair = report["pairs"][0]
    assert pair["policy"] == pair["reference"] and pair["policy_score"] == pair["reference_score"]
    assert pair["policy_tokens"] == pair["reference_tokens"] <= 6 + 2  # re-tokenised text can add a token or two


@pytest.mark.parametrize("case, message", [
    ("missing adapter", "--adapter .*: no such directory"),
    ("empty prompts", "no prompts in the file"),
    ("causal LM as reward model", "not a sequence classifier"),
    ("bad judge", "--judge bogus: expected"),
    ("bad prompt row", "row 2: field 'prompt'"),
])
def test_cli_refuses_bad_input_in_one_line(case, message, untrained_adapter, tmp_path, capsys):
    from course_utils.models import tiny_model_dir

    good = tmp_path / "p.txt"
    good.write_text("Hello\n")
    args = {"--adapter": str(untrained_adapter), "--prompts": str(good), "--judge": "sentiment"}
    if case == "missing adapter":
        args["--adapter"] = str(tmp_path / "nope")
    elif case == "empty prompts":
        (tmp_path / "empty.txt").write_text("\n\n")
        args["--prompts"] = str(tmp_path / "empty.txt")
    elif case == "causal LM as reward model":
        args["--judge"] = f"reward-model={tiny_model_dir(0)}"
    elif case == "bad judge":
        args["--judge"] = "bogus"
    else:
        (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
        args["--prompts"] = str(tmp_path / "bad.jsonl")
    code = main([x for kv in args.items() for x in kv] + ["--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "x.json").exists()


def test_python_dash_m_course_utils_evaluate_dispatches_to_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "course_utils.evaluate", "--adapter", str(tmp_path / "none"),
                           "--prompts", "sentiment-heldout", "--judge", "sentiment", "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no such directory" in done.stderr and "Traceback" not in done.stderr
