import json

import numpy as np
import pytest
from conftest import FIXTURES

from patchdiff_core.diffusion.respacing import MODIFIED_STRIDE, resolve_timesteps, space_timesteps


def test_evenly_spaced_known_outputs():
    # Values produced by ADM's / the seed's space_timesteps (see also the golden fixtures).
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "8") == [0, 143, 285, 428, 571, 714, 856, 999]
    assert space_timesteps(1000, "6") == [0, 200, 400, 599, 799, 999]
    assert space_timesteps(1000, 1000) == list(range(1000))
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[:4] == [0, 4, 8, 12] and steps[-1] == 999


def test_ddim_stride():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim600")  # stride 1 gives 1000, stride 2 gives 500


def test_sections_as_in_adm():
    # ADM's docstring example: 300 steps, sections [10, 15, 20].
    steps = space_timesteps(300, [10, 15, 20])
    assert len(steps) == 45
    assert steps[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert steps[10] == 100 and steps[24] == 199 and steps[25] == 200 and steps[-1] == 299


def test_modified_stride():
    steps = resolve_timesteps(MODIFIED_STRIDE)
    assert MODIFIED_STRIDE == "90,60,60,20,20"
    assert len(steps) == 250
    assert steps[:5] == [0, 2, 4, 7, 9]
    # Each section of 200 starts where it should and the densest sampling is near t = 0.
    for start in (200, 400, 600, 800):
        assert start in steps
    assert steps[-1] == 999
    assert sum(1 for s in steps if s < 200) == 90 and sum(1 for s in steps if s >= 800) == 20


@pytest.mark.parametrize(
    "spec", ["0", "1", "1001", "abc", "ddimx", "10,0", "-5", "logsnr1", "logsnr1001", "karras0", "karrasx", "logsnr"]
)
def test_bad_specs(spec):
    with pytest.raises(ValueError):
        resolve_timesteps(spec)


def test_every_count_and_section_list_as_the_original():
    """The original's own output (tests/fixtures/golden/respacing.json) for every count 1..1000."""
    ref = json.loads((FIXTURES / "respacing.json").read_text())
    assert len(ref["counts"]) == 1000
    wrong = [n for n, steps in ref["counts"].items() if space_timesteps(1000, int(n)) != steps]
    assert not wrong, f"{len(wrong)} counts differ from the original, e.g. {wrong[:5]}"
    for sections, steps in ref["sections"].items():
        assert space_timesteps(1000, sections) == steps, sections


@pytest.mark.parametrize("kind", ["logsnr", "karras"])
@pytest.mark.parametrize("beta_max", [0.02, 0.025])
def test_few_step_spacings_are_distinct_and_span_the_schedule(kind, beta_max):
    for count in (2, 3, 5, 10, 20, 50, 100, 250, 999, 1000):
        steps = resolve_timesteps(f"{kind}{count}", beta_max)
        assert len(steps) == count and steps == sorted(set(steps)), count
        assert steps[0] == 0 and steps[-1] == 999


def test_logsnr_spacing_is_uniform_in_log_snr():
    from patchdiff_core.diffusion.respacing import log_snr_table

    table = log_snr_table(0.02)
    steps = resolve_timesteps("logsnr10")
    gaps = np.diff(table[steps])
    # Uniform up to rounding to integer timesteps (the table moves by at most ~0.8 per timestep).
    assert np.all(gaps < 0) and np.ptp(gaps) < 0.2 * abs(gaps.mean())
    assert steps == [0, 5, 22, 73, 202, 410, 603, 757, 886, 999]
    # Karras: denser at low noise than uniform steps, sparser than log-SNR there.
    karras = resolve_timesteps("karras10")
    assert steps[1] < karras[1] < 111
    # The spacing follows the model's schedule: ffhq's beta_max gives other steps.
    assert resolve_timesteps("logsnr10", 0.025) != steps
    # The ADM forms ignore beta_max.
    assert resolve_timesteps("50", 0.025) == resolve_timesteps("50")


# Only ASCII digits count: Python's int() would take a sign, underscores, spaces around a number and
# any Unicode decimal digit (Arabic-Indic, Devanagari, fullwidth), so each form is parsed by pattern.
LENIENT_BY_INT = [
    "t:٥,٩٩٩", "t:५,९९९", "t:５,９９９", "t:+5,999", "t:-0,999", "t:1_0,999", "t: 5 , 999 ",
    "+250", "2_50", "２５０", "٢٥٠", "\u3000250", "250\xa0", "ddim+50", "ddim5_0", "ddim ５0", "ddim５０", "ddim 50",
    "karras+10", "karras1_0", "karras１０", "logsnr 10", "logsnr+10", "90,60,+60,20,20",
    "90, 60,60,20,20", "90,60,60,20,2_0", "90,60,60,20,２0",
]


@pytest.mark.parametrize("spec", LENIENT_BY_INT)
def test_specs_take_ascii_digits_only(spec):
    with pytest.raises(ValueError, match="timestep spec"):
        resolve_timesteps(spec)


@pytest.mark.parametrize("spec", [True, False])
def test_a_boolean_is_not_a_step_count(spec):
    with pytest.raises(ValueError):
        resolve_timesteps(spec)


@pytest.mark.parametrize("spec, count", [("250", 250), ("ddim50", 50), ("karras10", 10), ("logsnr10", 10),
                                         ("90,60,60,20,20", 250), ("t:5,999", 2), ("t:0,0500,999", 3), (20, 20),
                                         (" 250\n", 250), (" t:5,999 ", 2)])  # spaces around the whole spec
def test_strict_forms_still_read(spec, count):
    assert len(resolve_timesteps(spec)) == count
