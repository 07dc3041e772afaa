"""Pipeline schedules: the order in which each stage runs its forward and backward units.

A unit is ``(kind, microbatch, chunk)``: the forward (``F``) or backward (``B``) of one microbatch
through one of the stage's chunks of layers. With ``v`` chunks per stage, chunk ``c`` of stage ``s``
is virtual stage ``c p + s`` (the layers ``[(c p + s) L_c, (c p + s + 1) L_c)``): a microbatch goes
through every stage once per chunk, round the ring.

* ``gpipe`` (MaxText's circular pipeline, ``pipelines.py``): every forward, then every backward in
  the reverse order (the backward is the transpose of the forward's scan). At iteration ``t`` stage
  ``s`` runs microbatch ``(t - s) mod m`` of repeat ``(t - s) // m``: chunk by chunk, all microbatches.
* ``1f1b`` (the Ultra-Scale Playbook's, PipeDream-flush / Megatron-LM ``forward_backward_pipelining_
  without_interleaving``): ``p - s - 1`` warm-up forwards, then one forward one backward, then the
  remaining backwards.
* ``interleaved`` (the Playbook's / Megatron-LM ``forward_backward_pipelining_with_interleaving``):
  units taken ``p`` microbatches at a time per chunk; ``2 (p - s - 1) + (v - 1) p`` warm-up forwards.

Only the order is decided here; when a unit can start (its input permuted from the stage before) is
up to the simulation, so the bubble comes out of it.
"""

from __future__ import annotations

Unit = tuple[str, int, int]  # (F | B, microbatch, chunk of this stage)


def schedule(kind: str, p: int, m: int, v: int, s: int) -> list[Unit]:
    """Stage ``s``'s units in order (``p`` stages, ``m`` microbatches, ``v`` chunks per stage)."""
    if kind == "gpipe":
        fwd = [("F", j, c) for c in range(v) for j in range(m)]
        return fwd + [("B", j, c) for _, j, c in reversed(fwd)]
    if kind == "1f1b":
        warm = min(p - s - 1, m)
        order: list[Unit] = [("F", j, 0) for j in range(warm)]
        for i in range(m - warm):
            order += [("F", warm + i, 0), ("B", i, 0)]
        return order + [("B", j, 0) for j in range(m - warm, m)]
    if kind == "interleaved":
        total = m * v

        def unit(k: int, forward: bool) -> Unit:
            group = k // p
            chunk = group % v if forward else v - 1 - group % v
            return ("F" if forward else "B", (k // (p * v)) * p + k % p, chunk)

        warm = min(2 * (p - s - 1) + (v - 1) * p, total)
        order = [unit(k, True) for k in range(warm)]
        for i in range(total - warm):
            order += [unit(warm + i, True), unit(i, False)]
        return order + [unit(k, False) for k in range(total - warm, total)]
    raise ValueError(kind)


def peak_in_flight(order: list[Unit]) -> int:
    """Most chunk-microbatches whose forward has run and backward not yet: saved activations held."""
    live = peak = 0
    for kind, _, _ in order:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak
