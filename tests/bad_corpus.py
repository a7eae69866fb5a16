"""A corpus of malformed preference rows, shared by every entry point's tests.

Each case: (id, bad row, field the error must name, kind, words the reason must contain).
``test_data.py`` runs it through the validator and the file loaders;
``test_bad_input.py`` through the training builder, the CLI and the hub loader.
"""


def plain(i: int) -> dict:
    return {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}


def chat(i: int) -> dict:
    return {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Question {i}?"}],
        "chosen": [{"role": "assistant", "content": f"Good answer {i}."}],
        "rejected": [{"role": "assistant", "content": f"Bad answer {i}."}],
    }


def user(text="Hi"):
    return [{"role": "user", "content": text}]


def assistant(text="Hello"):
    return [{"role": "assistant", "content": text}]


# (id, bad row, field named in the error, kind, words the reason must contain)
BAD_ROWS = [
    ("not-a-dict", ["q", "a", "b"], None, "not_a_dict", "got list"),
    ("typo", {"prompt": "q", "choosen": "a", "rejected": "b"}, "chosen", "missing_field", "found 'choosen'"),
    ("missing", {"prompt": "q", "rejected": "b"}, "chosen", "missing_field", "missing field 'chosen'"),
    ("none", {"prompt": "q", "chosen": None, "rejected": "b"}, "chosen", "null", "None"),
    ("number", {"prompt": 7, "chosen": "a", "rejected": "b"}, "prompt", "wrong_type", "got int"),
    ("nested-junk", {"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"}, "chosen", "wrong_type", "got dict"),
    ("empty", {"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty_text", "empty or whitespace-only"),
    ("whitespace", {"prompt": "q", "chosen": "a", "rejected": " \n\t"}, "rejected", "empty_text", "whitespace-only"),
    ("identical", {"prompt": "q", "chosen": "Same.", "rejected": "  Same.\n"}, "rejected", "identical", "identical"),
    ("bad-bytes", {"prompt": "q", "chosen": b"caf\xe9", "rejected": "b"}, "chosen", "undecodable", "0xe9"),
    ("surrogate", {"prompt": "q", "chosen": "caf\udce9", "rejected": "b"}, "chosen", "undecodable", "surrogate"),
    ("msg-not-dict", {"prompt": ["Hi"], "chosen": assistant(), "rejected": assistant("No")},
     "prompt", "bad_message", "message 0 is a str"),
    ("msg-no-role", {"prompt": [{"content": "Hi"}], "chosen": assistant(), "rejected": assistant("No")},
     "prompt", "bad_message", "missing key 'role'"),
    ("msg-no-content", {"prompt": [{"role": "user", "text": "Hi"}], "chosen": assistant(), "rejected": assistant("No")},
     "prompt", "bad_message", "missing key 'content'"),
    ("msg-bad-role", {"prompt": [{"role": "usr", "content": "Hi"}], "chosen": assistant(), "rejected": assistant("No")},
     "prompt", "bad_message", "role 'usr'"),
    ("prompt-ends-assistant", {"prompt": user() + assistant(), "chosen": assistant("A"), "rejected": assistant("B")},
     "prompt", "bad_message", "end with a user turn"),
    ("chosen-user-turn", {"prompt": user(), "chosen": user("A"), "rejected": assistant("B")},
     "chosen", "bad_message", "assistant turns only"),
    ("msg-empty-content", {"prompt": user(), "chosen": assistant(" "), "rejected": assistant("B")},
     "chosen", "empty_text", "message 0: empty"),
    ("msg-none-content",
     {"prompt": user(), "chosen": assistant(), "rejected": [{"role": "assistant", "content": None}]},
     "rejected", "null", "None"),
    ("no-messages", {"prompt": user(), "chosen": [], "rejected": assistant("B")}, "chosen", "empty_text", "empty list"),
    ("chat-identical", {"prompt": user(), "chosen": assistant("Yes"), "rejected": assistant(" Yes ")},
     "rejected", "identical", "identical"),
    ("mixed-in-row", {"prompt": "q", "chosen": assistant("A"), "rejected": "b"}, "chosen", "mixed_format",
     "a row must use one format"),
]
BAD_IDS = [case[0] for case in BAD_ROWS]
