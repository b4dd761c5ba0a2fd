"""The pure core: the contracts and math of userembed, with no I/O.

Events, feature states, embedding records, model inputs, stabilization, the clock.
May import: nothing of service (numpy, msgspec and the standard library only)."""
