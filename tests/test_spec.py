"""Spec: every validation error names its field; seeded inputs are reproducible and mean the same
numbers in every dtype; derived values (needs, config, short) are right."""

from __future__ import annotations

import math

import pytest
import torch

from attnbench.spec import FEATURES, Block, Config, Spec, alibi_slopes

BAD = [
    ("B", dict(B=0)),
    ("B", dict(B=1.5)),
    ("B", dict(B=True)),
    ("Hq", dict(Hq=-1)),
    ("Hkv", dict(Hkv=0)),
    ("Hkv", dict(Hq=4, Hkv=3)),
    ("Sq", dict(Sq=0)),
    ("Sk", dict(Sk=0)),
    ("D", dict(D=0)),
    ("Dv", dict(Dv=-2)),
    ("dtype", dict(dtype="float8")),
    ("device", dict(device="tpu")),
    ("scale", dict(scale=math.inf)),
    ("scale", dict(scale=math.nan)),
    ("window", dict(window=(1, 2, 3))),
    ("window", dict(window=(-1, 0))),
    ("window", dict(window=(0, 1.5))),
    ("block", dict(block=Block(0))),
    ("block", dict(block=Block(2, -1, 0))),
    ("block", dict(block=Block(2, 0, -1))),
    ("key_lengths", dict(B=2, key_lengths=(3,))),
    ("key_lengths", dict(Sk=4, key_lengths=(5,))),
    ("key_lengths", dict(key_lengths=(-1,))),
    ("key_drop", dict(key_drop=1.0)),
    ("key_drop", dict(key_drop=-0.1)),
    ("bias", dict(bias="rope")),
    ("bias_neginf", dict(bias="full", bias_neginf=1.0)),
    ("bias_neginf", dict(bias_neginf=0.1)),
    ("align", dict(align="center")),
    ("dropout_p", dict(dropout_p=1.0)),
    ("dropout_p", dict(dropout_p=-0.5)),
    ("magnitude", dict(magnitude=0.0)),
    ("magnitude", dict(magnitude=math.inf)),
    ("softcap", dict(softcap=0.0)),
    ("softcap", dict(softcap=-1.0)),
    ("softcap", dict(softcap=math.inf)),
    ("softcap", dict(softcap=True)),
    ("alibi", dict(alibi=1)),
    ("sinks", dict(sinks="yes")),
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_every_bad_field_is_named(field, kwargs):
    with pytest.raises(ValueError, match=rf"^Spec\.{field}: "):
        Spec(**kwargs)


def test_defaults_are_filled_and_normalized():
    s = Spec(Hq=4, Sq=6, D=8, window=[None, None], block=(3, 2, 1), key_lengths=[6])
    assert (s.Hkv, s.Sk, s.Dv) == (4, 6, 8)
    assert s.window is None
    assert s.block == Block(3, 2, 1)
    assert s.key_lengths == (6,)
    assert Spec(window=[2, 0]).window == (2, 0)


def test_scale_zero_is_explicit_not_default():
    assert Spec(D=16).softmax_scale == pytest.approx(0.25)
    assert Spec(D=16, scale=0.0).softmax_scale == 0.0


def test_config_carries_the_call_fields():
    s = Spec(scale=0.5, causal=True, window=(3, 0), block=Block(2), align="top_left", dropout_p=0.1, seed=7)
    assert s.config() == Config(0.5, True, (3, 0), Block(2), "top_left", 0.1, 7)


@pytest.mark.parametrize(
    "kwargs,need",
    [
        (dict(), set()),
        (dict(causal=True), {"causal"}),
        (dict(window=(1, 1)), {"sliding_window"}),
        (dict(block=Block(2)), {"blocked_window"}),
        (dict(Hq=4, Hkv=2), {"gqa"}),
        (dict(Sq=3, Sk=5), {"cross"}),
        (dict(key_lengths=(3,)), {"key_padding"}),
        (dict(key_drop=0.2), {"key_padding"}),
        (dict(bias="alibi"), {"bias"}),
        (dict(dropout_p=0.1), {"dropout"}),
        (dict(align="top_left"), {"top_left"}),
        (dict(D=8, Dv=4), {"dv"}),
    ],
)
def test_needs(kwargs, need):
    s = Spec(**kwargs)
    assert s.needs() == need and s.needs() <= FEATURES


def test_short_round_trips():
    s = Spec(B=2, Hq=4, Hkv=2, Sq=5, Sk=9, D=8, causal=True, block=Block(3, 1, 0), key_lengths=(9, 4), seed=3)
    again = eval(s.short(), {"Spec": Spec, "Block": Block})
    assert again == s
    assert Spec().short() == "Spec(layout='contiguous')"  # the layout is always named


# -- seeded inputs ---------------------------------------------------------------------
FULL = Spec(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, D=4, Dv=3, key_lengths=(7, 2), key_drop=0.3, bias="full",
            bias_neginf=0.2, seed=11)


def test_same_spec_same_inputs():
    a, b = FULL.make_inputs(), FULL.make_inputs()
    for name, t in a.tensors().items():
        assert torch.equal(t, getattr(b, name)), name
    assert torch.equal(a.key_padding_mask, b.key_padding_mask)


def test_other_seed_other_inputs():
    a, b = FULL.make_inputs(), FULL.replace(seed=12).make_inputs()
    assert not torch.equal(a.q, b.q)


def test_inputs_have_the_spec_shapes_dtypes_and_grad():
    inp = FULL.make_inputs(requires_grad=True)
    assert inp.q.shape == (2, 4, 5, 4) and inp.k.shape == (2, 2, 7, 4) and inp.v.shape == (2, 2, 7, 3)
    assert inp.grad_out.shape == (2, 4, 5, 3) and inp.bias.shape == (2, 4, 5, 7)
    assert inp.key_padding_mask.shape == (2, 7) and inp.key_padding_mask.dtype == torch.bool
    assert inp.q.requires_grad and inp.bias.requires_grad and not inp.grad_out.requires_grad
    assert inp.q.dtype == torch.float32


def test_every_dtype_is_the_same_numbers_rounded():
    ref = FULL.replace(dtype="float64").make_inputs()
    for dtype in ("float32", "float16", "bfloat16"):
        low = FULL.replace(dtype=dtype).make_inputs()
        assert low.q.dtype == getattr(torch, dtype)
        for name, t in low.tensors().items():
            assert torch.equal(t, getattr(ref, name).to(t.dtype)), (dtype, name)
        assert torch.equal(low.key_padding_mask, ref.key_padding_mask)


def test_key_lengths_pad_the_tail_and_drop_is_a_subset():
    keep = Spec(B=2, Sk=6, key_lengths=(6, 2)).make_inputs().key_padding_mask
    assert keep.tolist() == [[True] * 6, [True, True, False, False, False, False]]
    dropped = Spec(B=2, Sk=6, key_lengths=(6, 2), key_drop=0.5, seed=1).make_inputs().key_padding_mask
    assert not (dropped & ~keep).any()
    assert Spec().make_inputs().key_padding_mask is None


def test_bias_shapes_and_neginf_fraction():
    shapes = {"full": (2, 3, 4, 5), "per_head": (1, 3, 4, 5), "per_key": (2, 1, 1, 5), "alibi": (1, 3, 4, 5)}
    for kind, shape in shapes.items():
        assert Spec(B=2, Hq=3, Sq=4, Sk=5, bias=kind).make_inputs().bias.shape == shape
    b = Spec(B=4, Hq=4, Sq=16, Sk=16, bias="full", bias_neginf=0.25).make_inputs().bias
    frac = torch.isneginf(b).double().mean().item()
    assert 0.15 < frac < 0.35


def test_alibi_bias_is_minus_slope_times_distance_bottom_right():
    b = Spec(Hq=2, Sq=2, Sk=4, bias="alibi", dtype="float64").make_inputs().bias[0]
    slopes = alibi_slopes(2)
    dist = torch.tensor([[2.0, 1.0, 0.0, 1.0], [3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(b, -slopes[:, None, None] * dist)


def test_alibi_slopes():
    assert alibi_slopes(8).tolist() == pytest.approx([2.0 ** -(i + 1) for i in range(8)])
    six = alibi_slopes(6)  # 4 of the power-of-two series, then every other one of the 8-series
    assert six.tolist() == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


def test_padding_keep_and_visible_counts_follow_the_mask_make_inputs_draws() -> None:
    """visible_counts (cuDNN's one-key declaration) sees the random key_drop mask the tests use."""
    from attnbench.masks import visible_counts

    for seed in range(4):
        spec = Spec(B=2, Hq=4, Hkv=2, Sq=5, Sk=9, D=8, Dv=16, window=(2, 1), key_drop=0.25, bias="full", seed=seed)
        kpm = spec.make_inputs().key_padding_mask
        assert torch.equal(spec.padding_keep(), kpm)
        assert torch.equal(visible_counts(spec), visible_counts(spec, kpm))
        rows = range(4, 9)  # bottom-right: query i sits at key i + Sk - Sq and sees keys p-2 .. p+1
        want = [[int(kpm[b, max(0, p - 2): min(9, p + 2)].sum()) for p in rows] for b in range(2)]
        assert visible_counts(spec).tolist() == want
    assert Spec(Sq=3).padding_keep() is None
    assert Spec(Sq=3, Sk=5, key_lengths=(2,)).padding_keep().tolist() == [[True, True, False, False, False]]


@pytest.mark.parametrize("cap", [0.0, -2.0, math.nan, math.inf, "1", True])
def test_config_softcap_must_be_finite_and_positive(cap):
    with pytest.raises(ValueError, match=r"^Config\.softcap: must be None or a finite number > 0"):
        Config(scale=1.0, softcap=cap)


def test_score_features_are_needed_and_configured():
    s = Spec(Hq=3, softcap=2.5, alibi=True, sinks=True)
    assert {"softcap", "alibi", "sinks"} <= s.needs() <= FEATURES
    assert s.config().softcap == 2.5
    assert eval(s.short()) == s  # the short form is valid Python


def test_score_features_leave_the_other_inputs_unchanged():
    """Slopes and sinks come from their own generators: a spec keeps its q, k, v, bias, mask and
    grad_out whether or not it uses them."""
    base = Spec(B=2, Hq=3, Sq=5, Sk=7, key_drop=0.25, bias="full", seed=11)
    plain, scored = base.make_inputs(), base.replace(alibi=True, sinks=True, softcap=3.0).make_inputs()
    for name in ("q", "k", "v", "bias", "key_padding_mask", "grad_out"):
        assert torch.equal(getattr(plain, name), getattr(scored, name)), name
    assert plain.alibi_slopes is None and plain.sinks is None and plain.score_kwargs() == {}
    assert set(scored.score_kwargs()) == {"alibi_slopes", "sinks"}


def test_alibi_values_are_positive_distinct_and_include_the_geometric_slopes():
    kinds = set()
    for seed in range(40):
        spec = Spec(B=2, Hq=4, alibi=True, seed=seed)
        slopes = spec.alibi_values()
        assert slopes.shape in ((4,), (2, 4)) and bool((slopes > 0).all())
        assert all(len(set(row.tolist())) == 4 for row in slopes.view(-1, 4))
        kinds.add("geometric" if torch.equal(slopes, alibi_slopes(4)) else tuple(slopes.shape))
        assert spec.make_inputs().alibi_slopes.dtype == torch.float32
    assert kinds == {"geometric", (4,), (2, 4)}


def test_sink_values_include_dominant_and_negligible_sinks():
    values = torch.stack([Spec(Hq=2, sinks=True, seed=seed).sink_values() for seed in range(60)])
    assert bool((values >= 20).any()) and bool((values <= -20).any())
    assert bool((values.abs() < 5).any())
    assert Spec(dtype="float16", sinks=True).make_inputs().sinks.dtype == torch.float16


def test_sinks_float32_passes_the_same_sinks_unrounded():
    """sinks_float32: the sinks in float32 (CONTRACT.md takes q's dtype or float32), the same
    values as in q's dtype before rounding; without sinks it is inert and reads False."""
    spec = Spec(Hq=2, dtype="bfloat16", sinks=True, sinks_float32=True, seed=2)
    sinks = spec.make_inputs().sinks
    assert sinks.dtype == torch.float32
    assert torch.equal(sinks, spec.sink_values().float())
    assert not torch.equal(sinks, spec.replace(sinks_float32=False).make_inputs().sinks.float())
    assert spec.replace(sinks=False).sinks_float32 is False
    assert eval(repr(spec)) == spec


def test_fp8_specs_quantize_per_tensor_and_print_as_python():
    """Spec.fp8: e4m3 q, k, v with float32 descales amax / 448 (t8 * descale within e4m3's
    rounding of t), bfloat16 output dtype, forward only, pasteable."""
    spec = Spec(B=2, Hq=2, Sq=9, D=16, dtype="bfloat16", magnitude=3.0, fp8=True)
    assert "fp8" in spec.needs() and eval(spec.short()) == spec  # noqa: S307 (the repr is Python)
    inputs = spec.make_inputs()
    plain = spec.replace(fp8=False, dtype="float64").make_inputs()
    for name in ("q", "k", "v"):
        t8, d, t = getattr(inputs, name), getattr(inputs, f"{name}_descale"), getattr(plain, name)
        assert t8.dtype == torch.float8_e4m3fn and d.dtype == torch.float32 and d.shape == ()
        assert float(d) == pytest.approx(float(t.abs().max()) / 448, rel=1e-6)
        assert (t8.double() * float(d) - t).abs().max() <= 2**-4 * t.abs().max()  # half an e4m3 eps of amax at most
    assert set(inputs.score_kwargs()) == {"q_descale", "k_descale", "v_descale"}
    with pytest.raises(ValueError, match="Spec.dtype: an fp8 spec's output dtype is 'bfloat16'"):
        Spec(fp8=True)
    with pytest.raises(ValueError, match="forward only"):
        spec.make_inputs(requires_grad=True)
