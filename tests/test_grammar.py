import pytest
from hypothesis import given, settings, strategies as st

import cellseg_plugins as cs
from cellseg_plugins import SpecError, parse_spec


@pytest.mark.parametrize("text", [
    "unet",
    "UNet",
    "unet+scse",
    "fpn(encoder=\"resnet34\") + scse(reduction = 8)",
    "  unet ( encoder = 'resnet18' , encoder_depth=4, decoder_channels=[64, 32, 16, 8] )  ",
])
def test_valid_specs_round_trip(text):
    spec = parse_spec(text)
    assert parse_spec(str(spec)) == spec
    assert str(parse_spec(str(spec))) == str(spec)


def test_canonical_form_is_normalised():
    spec = parse_spec(" UNET( encoder_depth=4, ENCODER='resnet18') + SCSE( reduction=8 ) ")
    assert str(spec) == "unet(encoder='resnet18',encoder_depth=4)+scse(reduction=8)"
    assert spec.arch.kwargs == {"encoder": "resnet18", "encoder_depth": 4}


def test_sequences_normalise_to_tuples():
    spec = parse_spec("unet(decoder_channels=(64,32,16,8,4))")
    assert spec.arch.kwargs["decoder_channels"] == (64, 32, 16, 8, 4)
    assert parse_spec("unet(decoder_channels=[64,32,16,8,4])") == spec


@pytest.mark.parametrize("text, fragment, column", [
    ("unet+scsee", "did you mean 'scse'", 6),
    ("unte", "did you mean 'unet'", 1),
    ("unet+scse(reductio=8)", "unknown parameter 'reductio' (valid: reduction, where)", 11),
    ("unet+scse(reduction='x')", "reduction: expected int, got str 'x'", 11),
    ("unet+scse(reduction=0)", "out of range [1, 1024]", 11),
    ("unet+scse(8)", "positional argument", 11),
    ("unet+scse(where='middle')", "'middle' is not one of 'encoder', 'decoder', 'both'", 11),
    ("unet+scse+scse", "may appear only once", 11),
    ("dpt+lfa", "does not support arch 'dpt'", 5),
    ("unet+scse(reduction=__import__('os').getpid())", "only literal values", 11),
    ("unet+scse(reduction={1: 2})", "only finite numbers", 11),
    ("unet+scse(reduction=1e999)", "only finite numbers", 11),
    ("unet(", "'(' was never closed", 5),  # the column of the wrapping bracket (1) before
    ("unet+lfa(stages=(0,1)", "'(' was never closed", 9),
    ("unet+lfa(m=7))", "unmatched ')'", 14),  # no column before
    ("unet+lfa(stages=[0,1)", "unmatched ')'", 21),
    ("unet(encoder='resnet18)", "the quote ' is never closed", 14),
    ("unet+lfa+", "a '+' with no term after it; expected e.g.", 9),
    ("unet++", "a '+' with no term after it (smp's Unet++ is 'unetplusplus')", 5),
    ("unet-scse", "expected name or name(key=value, ...)", 1),
    ("scse", "a spec starts with an architecture", 1),
    ("unet+fpn", "only the first term", 6),
    ("unet+scse(reduction=4, reduction=8)", "reduction", None),
    ("", "empty spec", 1),
])
def test_invalid_specs_give_one_line_errors(text, fragment, column):
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    message = str(err.value)
    assert "\n" not in message
    assert fragment in message
    if column is not None:
        assert err.value.column == column


def test_brackets_inside_strings_are_not_counted():
    assert parse_spec("unet(encoder='a(]')").arch.kwargs["encoder"] == "a(]"


def test_parsing_never_evaluates(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(SpecError):
        parse_spec(f"unet(encoder=open({str(marker)!r}, 'w').name)")
    assert not marker.exists()


# ---------------------------------------------------------------- property test: round trip

literals = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
              st.floats(allow_nan=False, allow_infinity=False, width=32),
              st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@st.composite
def spec_texts(draw):
    """Valid spec strings over the registered archs, with random spacing and case."""
    arch = draw(st.sampled_from(cs.list_archs()))
    parts = [draw(st.sampled_from([arch, arch.upper(), arch.title()]))]
    entry = cs.registry.get_entry(arch)
    chosen = draw(st.lists(st.sampled_from(entry.params), unique_by=lambda p: p.name, max_size=3))
    args = []
    for p in chosen:
        value = draw(literals)
        try:
            value = p.check(value)
        except ValueError:
            continue
        args.append(f"{p.name}{draw(st.sampled_from(['=', ' = ']))}{cs.registry.spec.format_value(value)}")
    if args:
        parts[0] += "(" + draw(st.sampled_from([",", " , "])).join(args) + ")"
    if arch != "dpt" and draw(st.booleans()):
        r = draw(st.integers(1, 1024))
        parts.append(f"scse(reduction={r})")
    return draw(st.sampled_from(["+", " + "])).join(parts)


@settings(max_examples=200, deadline=None)
@given(spec_texts())
def test_round_trip_property(text):
    spec = parse_spec(text)
    assert parse_spec(str(spec)) == spec
