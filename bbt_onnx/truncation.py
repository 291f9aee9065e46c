"""The one rule for cutting a row's text to fit: pure Python, so that the runtime's encoding (`encoding.py`) and a
deployed classifier's standalone `encode.py` (deploy carries this function's source into it) plan alike."""


def truncation_plan(counts: dict[str, int], over: int) -> dict[str, int] | None:
    """How many tokens to cut from each field so that `over` go in all: always from the longest field
    (the first named wins a tie), each keeping at least one token; None when that cannot be done."""
    order = list(counts)
    present = [f for f in order if counts[f] > 0]
    if sum(counts[f] for f in present) - over < len(present):
        return None
    drop = {f: 0 for f in order}
    left = dict(counts)
    # cut the longest down to the next one's length, then share the rest out evenly, first named first
    while over > 0:
        top = max(left.values())
        longest = [f for f in order if left[f] == top]
        below = max([v for v in left.values() if v < top], default=0)
        step = min(over, (top - below) * len(longest))
        share, extra = divmod(step, len(longest))
        for j, f in enumerate(longest):
            cut = share + (1 if j < extra else 0)
            drop[f] += cut
            left[f] -= cut
        over -= step
    return drop
