"""Crosstalk "spot" exposures: a dark dome, a spot projector, saturating spots on some amplifiers.

The Calibration Products Production measures each CCD's 16×16 amplifier crosstalk from exposures with
bright sources (LDM-230; issue 3). A night of science exposures holds too few saturated pixels per
amplifier pair, so the camera team takes dedicated exposures with a spot projector that images a
pattern of pinholes directly onto the focal plane (as the Camera Calibration Optical Bench's narrow beam
does): no sky, no telescope optics, so the spots are sharp on the wavefront sensors too.

Each of the :data:`N_SPOT_EXPOSURES` exposures of a CCD lights one amplifier in every group of four
consecutive amplifiers (HDU order) with one spot of :data:`SPOT_FLUX_E` electrons and a
:data:`SPOT_FWHM_PIX` Moffat profile (β = :data:`~lsstpipe.sim.scene.PSF_BETA`): the peak is several times
the full well, so every spot saturates and bleeds along its column as saturated stars do. Exposure ``k``
uses pattern ``k`` (:func:`lit_amplifiers`): in the first round of four patterns the lit amplifiers are
every fourth one (HDUs 1, 5, 9, 13; then 2, 6, 10, 14; ...); each later round shifts the choice in each
group of four, so no two of the first 16 patterns light the same subset, no two neighbouring amplifiers
are ever lit together, and with a multiple of four exposures every amplifier is a source equally often (twice
for the default eight). Spot positions are uniform inside the lit amplifier's data section, away from
its edges by :data:`SPOT_MARGIN_PIX` so that the spot and its bleed trail stay on that amplifier; they
are drawn from a stream keyed by (seed, camera, detector, exposure), so they do not depend on the order
in which detectors are simulated or on the number of MPI ranks.
"""

from __future__ import annotations

import numpy as np

from kernels.render import moffat_fwhm_to_alpha
from lsstpipe.camera import Detector
from lsstpipe.sim.instrument import stable_seed
from lsstpipe.sim.scene import PSF_BETA, Sources

#: Spot exposures per CCD in a ``--calibs`` run (a multiple of :data:`AMPS_PER_GROUP`).
N_SPOT_EXPOSURES = 8
#: Electrons in one spot (before bleeding); about 40× the full well at the spot's peak.
SPOT_FLUX_E = 1.0e7
#: FWHM of a spot in pixels (a Moffat profile with the PSF's β).
SPOT_FWHM_PIX = 4.0
#: Exposure time of a spot exposure in seconds (the projector's flash; the shutter is open this long).
SPOT_EXPTIME = 1.0
#: One amplifier in each group of this many consecutive amplifiers is lit per exposure.
AMPS_PER_GROUP = 4
#: Per round of four patterns, the offset of the lit amplifier in each of the four groups (see
#: :func:`lit_amplifiers`).
ROUND_OFFSETS = ((0, 0, 0, 0), (0, 3, 2, 1), (0, 2, 0, 2), (0, 3, 1, 0))
#: Smallest distance (pixels, along x and along y) from a spot centre to its amplifier's data edges;
#: y leaves room for the bleed trail (≈ 15 pixels long for 1e7 e-: most of the charge is below full well).
SPOT_MARGIN_PIX = (12, 40)
#: ``kind`` of the spots in :class:`~lsstpipe.sim.scene.Sources`.
KIND_SPOT = "spot"


def check_spot_count(n: int) -> int:
    """``n`` if it is a valid number of spot exposures per CCD (0, or a positive multiple of four).

    Raises
    ------
    ValueError
        Otherwise, saying why and what to ask for.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"the number of spot exposures must be an integer, not {n!r}")
    if n < 0 or n % AMPS_PER_GROUP:
        raise ValueError(
            f"{n} spot exposures: ask for 0 or a positive multiple of {AMPS_PER_GROUP} (e.g. "
            f"{N_SPOT_EXPOSURES}), so that every amplifier is lit as a crosstalk source equally often"
        )
    return int(n)


def lit_amplifiers(pattern: int) -> list[int]:
    """0-based HDU positions of the four amplifiers lit in spot pattern ``pattern`` (≥ 0).

    Pattern ``k`` = 4 r + p lights, in each group g of four consecutive amplifiers, the one at position
    ``(p + ROUND_OFFSETS[r mod 4][g]) mod 4`` of the group: in round r = 0 every fourth amplifier from
    ``p``. Each round partitions the 16 amplifiers; the rounds' offsets differ by no constant, so the 16
    patterns are 16 different subsets; consecutive offsets never step by +1 (mod 4), so the last amplifier
    of a group and the first of the next are never lit together.
    """
    if isinstance(pattern, bool) or not isinstance(pattern, (int, np.integer)) or pattern < 0:
        raise ValueError(f"spot pattern {pattern!r} is not an integer ≥ 0; patterns are numbered from 0")
    r, p = divmod(int(pattern), AMPS_PER_GROUP)
    offsets = ROUND_OFFSETS[r % len(ROUND_OFFSETS)]
    return [g * AMPS_PER_GROUP + (p + c) % AMPS_PER_GROUP for g, c in enumerate(offsets)]


def spot_peak_e(flux_e, fwhm_pix) -> np.ndarray:
    """Central surface brightness (electrons per pixel) of a Moffat spot, before saturation."""
    alpha = moffat_fwhm_to_alpha(1.0, PSF_BETA) * np.asarray(fwhm_pix, float)  # alpha is linear in the FWHM
    return np.asarray(flux_e, float) * (PSF_BETA - 1.0) / (np.pi * alpha**2)


def spot_sources(detector: Detector, obsid: str, pattern: int, seed: int, camera_name: str) -> Sources:
    """The spots of spot pattern ``pattern`` on ``detector`` in exposure ``obsid``.

    Parameters
    ----------
    detector : Detector
        The CCD; its amplifiers' ``bbox`` (assembled-image data sections) place the spots.
    obsid : str
        The exposure, which keys the random positions with ``seed``, ``camera_name`` and the detector.
    pattern : int
        Which amplifiers are lit (:func:`lit_amplifiers`).
    seed : int
        The simulation's seed.
    camera_name : str
        The camera's name (part of the random key, as for every exposure).

    Returns
    -------
    Sources
        One source per lit amplifier: ``id`` is the amplifier's HDU number (1-based), ``kind`` is
        :data:`KIND_SPOT`, ``x, y`` the 0-based position in the assembled image, ``flux_e`` electrons,
        round Moffat of :data:`SPOT_FWHM_PIX`; ``ra, dec, mag`` are NaN (the projector is not on the sky).
    """
    amps = sorted(detector.amps, key=lambda a: a.hdu)
    if len(amps) != AMPS_PER_GROUP**2:
        raise ValueError(f"{detector.name} has {len(amps)} amplifiers; spot patterns are for 16-amplifier CCDs")
    lit = [amps[i] for i in lit_amplifiers(pattern)]
    rng = np.random.default_rng(stable_seed("spots", seed, camera_name, detector.name, obsid))
    mx, my = SPOT_MARGIN_PIX
    xs, ys = np.empty(len(lit)), np.empty(len(lit))
    for k, a in enumerate(lit):
        y0, y1, x0, x1 = a.bbox
        if x1 - x0 <= 2 * mx or y1 - y0 <= 2 * my:
            raise ValueError(f"amplifier {a.name} of {detector.name} ({y1 - y0}×{x1 - x0} pixels) is too small "
                             f"for spots {mx}/{my} pixels from its edges")  # fmt: skip
        xs[k] = rng.uniform(x0 + mx, x1 - 1 - mx)
        ys[k] = rng.uniform(y0 + my, y1 - 1 - my)
    n = len(lit)
    nan = np.full(n, np.nan)
    zero = np.zeros(n)
    return Sources(
        id=np.array([a.hdu for a in lit], np.int64), kind=np.full(n, KIND_SPOT, dtype=object), ra=nan, dec=nan.copy(),
        x=xs, y=ys, x_end=xs.copy(), y_end=ys.copy(), mag=nan.copy(), flux_e=np.full(n, SPOT_FLUX_E),
        fwhm=np.full(n, SPOT_FWHM_PIX), e1=zero, e2=zero.copy(),
    )  # fmt: skip
