"""Seeds derived from the user's: torch's generators take seeds in [0, 2⁶⁴), and a seed near the top plus an offset
(a preview stream, a batch's start, a word's hash) overflowed them. Derived seeds wrap instead; below the top they are
the sums they always were, so no seeded result changes."""

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds below it (and negative ones, not offered)
SEED_RANGE = "between 0 and 2^64 − 1"  # what a refusal of a seed says


def valid_seed(seed: int) -> bool:
    return 0 <= seed < SEED_LIMIT


def offset_seed(seed: int, offset: int) -> int:
    """``seed + offset``, wrapped into the seeds torch takes."""
    return (seed + offset) % SEED_LIMIT
