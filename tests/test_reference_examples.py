"""vector-quantize-pytorch's README, as installed, runs with `rqlm.quantizers` in place of the reference.

The python blocks of the installed package's long description (its METADATA) are executed unchanged but
for the import line. The reference's constructor keywords are read from its signatures, so a keyword a
new reference version adds fails here until rqlm implements it or declares it reference-only.
"""

import importlib.metadata
import inspect
import os
import re

import pytest
import torch

import rqlm.quantizers
from rqlm.modeling.quantizer_utils import keyword_names

vqp = pytest.importorskip("vector_quantize_pytorch")

REFERENCE_IMPORT = "from vector_quantize_pytorch import"
RQLM_IMPORT = "from rqlm.quantizers import"

# reference classes rqlm deliberately does not have, and why
NOT_IN_RQLM = {
    "FSP": "finite scalar perturbation (stochastic FSQ training), not one of rqlm's quantizer families",
}
# examples that switch on a reference feature rqlm declares unimplemented: they must refuse in one line
REFUSED = {
    "diveq = True": "DiVeQ codebook learning for ResidualVQ is not implemented in rqlm",
}
# examples that run for tens of seconds on one CPU thread in both libraries (33 s and 38 s unloaded): LFQ
# with 65,536 codes on a video feature map, whose entropy loss scores 10,240 positions x 65,536 codes
SLOW = [("codebook_size = 65536", "video_feats = torch.randn(1, 16, 10, 32, 32)")]
RUN_SLOW = os.environ.get("RQLM_SLOW") == "1"

# rqlm's classes that carry a reference name, and the classes of the reference they stand for
SHARED_CLASSES = [
    name for name in rqlm.quantizers.__all__ if name[0].isupper() and hasattr(vqp, name)
]


def readme_blocks() -> list[str]:
    metadata = importlib.metadata.distribution("vector-quantize-pytorch").read_text("METADATA")
    return re.findall(r"```python\n(.*?)```", metadata, flags=re.DOTALL)


def example_params() -> list:
    params = []
    for index, block in enumerate(readme_blocks()):
        slow = any(all(part in block for part in parts) for parts in SLOW)
        marks = [pytest.mark.slow, pytest.mark.skipif(not RUN_SLOW, reason="slow; RQLM_SLOW=1 runs it")]
        marks = marks if slow else []
        params.append(pytest.param(block, id=f"block{index}", marks=marks))
    return params


def imported_names(block: str) -> list[str]:
    names = []
    for line in block.splitlines():
        if line.startswith(REFERENCE_IMPORT):
            names += [name.strip() for name in line[len(REFERENCE_IMPORT) :].split(",")]
    return names


def run(block: str, module_import: str) -> None:
    code = block.replace(REFERENCE_IMPORT, module_import)
    torch.manual_seed(0)
    exec(compile(code, "<readme example>", "exec"), {"__name__": "readme_example"})  # noqa: S102 (the point)


def test_the_readme_has_examples():
    blocks = readme_blocks()
    assert len(blocks) >= 20, f"found only {len(blocks)} python blocks in the installed README"
    assert sum(REFERENCE_IMPORT in block for block in blocks) == len(blocks)


@pytest.mark.parametrize("block", example_params())
def test_readme_example_runs_with_rqlm(block):
    missing = [name for name in imported_names(block) if not hasattr(rqlm.quantizers, name)]
    undeclared = [name for name in missing if name not in NOT_IN_RQLM]
    assert not undeclared, f"the example imports {undeclared}, which rqlm.quantizers lacks"
    if missing:
        pytest.skip("; ".join(NOT_IN_RQLM[name] for name in missing))
    refusal = next((reason for key, reason in REFUSED.items() if key in block), None)
    if refusal:
        with pytest.raises(ValueError, match="is not implemented in rqlm"):
            run(block, RQLM_IMPORT)
        return
    try:
        run(block, RQLM_IMPORT)
    except Exception as rqlm_error:
        try:
            run(block, REFERENCE_IMPORT)
        except Exception:  # noqa: BLE001 (any failure of the reference itself)
            return  # the example fails with the reference itself (undefined names, a refused combination)
        raise AssertionError(f"runs with the reference, fails with rqlm: {rqlm_error!r}") from rqlm_error


@pytest.mark.parametrize("name", SHARED_CLASSES)
def test_every_reference_keyword_is_implemented_or_declared(name):
    reference = inspect.signature(getattr(vqp, name).__init__).parameters.values()
    wanted = {p.name for p in reference if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    cls = getattr(rqlm.quantizers, name)
    missing = wanted - keyword_names(cls)
    assert not missing, f"{name}: reference keywords {sorted(missing)} are neither implemented nor declared"
    declared = getattr(cls, "REFERENCE_ONLY_KEYWORDS", {})
    defaults = {p.name: p.default for p in reference}
    for keyword, default in declared.items():
        assert keyword in defaults, f"{name}.{keyword} is declared reference-only but the reference lacks it"
        assert repr(defaults[keyword]) == repr(default), f"{name}.{keyword}: the reference's default differs"


def test_every_reference_forward_keyword_is_implemented_or_declared():
    for name in SHARED_CLASSES:
        reference = inspect.signature(getattr(vqp, name).forward).parameters.values()
        wanted = {p.name for p in reference if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        cls = getattr(rqlm.quantizers, name)
        rqlm_names = set(inspect.signature(cls.forward).parameters)
        declared = set(getattr(cls, "REFERENCE_ONLY_FORWARD_KEYWORDS", {}))
        missing = wanted - rqlm_names - declared - {"self"}
        assert not missing, f"{name}.forward: reference keywords {sorted(missing)} are neither implemented nor declared"


def _non_default(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, dict):
        return {**value, "extra": 1}
    return 2  # None -> something


SMALL_ARGUMENTS = {
    "VectorQuantize": {"dim": 4, "codebook_size": 8},
    "ResidualVQ": {"dim": 4, "codebook_size": 8, "num_quantizers": 2},
    "GroupedResidualVQ": {"dim": 4, "codebook_size": 8, "num_quantizers": 2, "groups": 2},
}
DECLARED = [
    (name, keyword, default)
    for name in SMALL_ARGUMENTS
    for keyword, default in getattr(getattr(rqlm.quantizers, name), "REFERENCE_ONLY_KEYWORDS", {}).items()
]


@pytest.mark.parametrize("name,keyword,default", DECLARED, ids=[f"{n}.{k}" for n, k, _ in DECLARED])
def test_reference_only_keyword_accepted_at_default_refused_otherwise(name, keyword, default):
    cls = getattr(rqlm.quantizers, name)
    cls(**SMALL_ARGUMENTS[name], **{keyword: default})
    with pytest.raises(ValueError, match=rf"^{name}: {keyword}=.* is not implemented in rqlm; leave it at"):
        cls(**SMALL_ARGUMENTS[name], **{keyword: _non_default(default)})


def test_reference_only_keywords_reach_through_stacked_quantizers():
    with pytest.raises(ValueError, match="^VectorQuantize: directional_reparam=True is not implemented"):
        rqlm.quantizers.GroupedResidualVQ(**SMALL_ARGUMENTS["GroupedResidualVQ"], directional_reparam=True)
    vq = rqlm.quantizers.VectorQuantize(dim=4, codebook_size=8)
    vq(torch.randn(1, 3, 4), accum_ema_update=False)
    with pytest.raises(ValueError, match="^VectorQuantize.forward: accum_ema_update=True is not implemented"):
        vq(torch.randn(1, 3, 4), accum_ema_update=True)


@pytest.mark.parametrize(
    "name,arguments",
    [
        ("VectorQuantize", SMALL_ARGUMENTS["VectorQuantize"]),
        ("ResidualVQ", SMALL_ARGUMENTS["ResidualVQ"]),
        ("GroupedResidualVQ", SMALL_ARGUMENTS["GroupedResidualVQ"]),
        ("FSQ", {"levels": [3, 3]}),
        ("LFQ", {"dim": 4, "codebook_size": 16}),
        ("ResidualLFQ", {"dim": 4, "codebook_size": 16, "num_quantizers": 2}),
        ("ResidualFSQ", {"dim": 4, "levels": [3, 3], "num_quantizers": 2}),
        ("LatentQuantize", {"dim": 4, "levels": [3, 3]}),
        ("SimVQ", {"dim": 4, "codebook_size": 8}),
        ("ResidualSimVQ", {"dim": 4, "codebook_size": 8, "num_quantizers": 2}),
        ("RandomProjectionQuantizer", {"dim": 4, "codebook_size": 8, "codebook_dim": 2}),
    ],
)
def test_unknown_keyword_is_a_one_line_error_listing_valid_ones(name, arguments):
    with pytest.raises(ValueError) as error:
        getattr(rqlm.quantizers, name)(**arguments, bogus_kw=1)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{name} got an unknown keyword 'bogus_kw'; valid keywords: ")
    assert "dim" in message.split("valid keywords: ")[1].split(", ")


def test_build_quantizer_refuses_unknown_keyword_in_one_line():
    with pytest.raises(ValueError, match="^ResidualVQ got an unknown keyword 'bogus_kw'"):
        rqlm.quantizers.build_quantizer("rvq", dim=8, num_quantizers=2, codebook_size=16, bogus_kw=1)
