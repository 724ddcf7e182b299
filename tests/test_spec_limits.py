"""Hostile specs: stated limits, no comments, short one-line errors, never another exception."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellseg_plugins as cs
from cellseg_plugins.registry.spec import MAX_ITEMS, MAX_LENGTH, MAX_TERMS

GOOD = ["classic_unet(width=4)+lfa(m=3)+frem(B=2,X=250.0)",
        "unet(encoder='resnet18')+scse(reduction=8)+attention_gate",
        "fpn(encoder='resnet18')+bottleneck_dropout(p=0.1)",
        "classic_unet(width=4)+feedback_convlstm(at=['e1','d1'],cell='rcl')",
        "classic_unet(width=4,se=True)+bottleneck_supervision(lam=0.5)"]
ALPHABET = "abcdefgilmnoprstuvwxyz_0123456789+()=,[]'\". #-\\\n\t\x00é"


def outcome(text: str) -> str:
    """'built', or the SpecError's message; any other exception fails the test."""
    try:
        cs.create_model(cs.parse_spec(text), classes=3)
        return "built"
    except cs.SpecError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 200, message
        return message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=ALPHABET, max_size=80))
def test_random_text_builds_or_fails_in_one_short_line(text):
    outcome(text)


@st.composite
def mutated(draw):
    text = list(draw(st.sampled_from(GOOD)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from(ALPHABET))
        if op == "insert":
            text.insert(i, char)
        elif text and i < len(text):
            if op == "delete":
                del text[i]
            else:
                text[i] = char
    return "".join(text)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_specs_build_or_fail_in_one_short_line(text):
    outcome(text)


@pytest.mark.parametrize("text, fragment", [
    ("classic_unet+lfa(m=7)# anything", "comments are not allowed in a spec: '# anything'"),
    ("classic_unet" + "+frem" * 3000, f"the limit is {MAX_LENGTH}"),
    ("classic_unet" + "+frem" * MAX_TERMS, f"more than {MAX_TERMS} terms"),
    ("classic_unet(width=[[[[4]]]])", "brackets nest deeper than 3"),
    (f"classic_unet+lfa(stages={list(range(MAX_ITEMS + 1))})", "the limit is 64"),
    ("classic_unet+lfa(m=7)\n+frem", "character '\\n' is not allowed"),
    ("classic_unet+" + "q" * 1000, "unknown name 'qqqq"),
])
def test_each_limit_is_one_line(text, fragment):
    message = outcome(text)
    assert fragment in message and len(message) < 200
