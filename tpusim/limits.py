"""The sizes tpusim accepts, and the one place that says so (the README's "Limits" paragraph lists them).

Each limit is far above anything real hardware or a real profile has, and far below what would make
a run take minutes or gigabytes: past it, an input is refused with one line naming it, never
simulated for an hour. Why each number:

* ``MAX_CHIPS`` (2^20): the largest published training job, 50,944 v5e chips (Google Cloud, "the
  largest distributed training job", Nov 2023), x20. A 1M-chip step simulates in ~5 s (symmetric
  devices are simulated once); the limit stops ``--slices 1000000000`` (256 billion chips) that
  spent 6 GB before dying.
* ``MAX_SLICES`` (4,096): 50,944 v5e chips are 199 slices of 256; x20.
* ``MAX_BYTES`` (1 PB): one collective, or one array of an HLO program, per device. The largest HBM
  is 192 GB per chip (TPU7x, chips.yaml); 1 PB is 5,000 times that, and keeps every time finite
  and every sum of bytes exact in float64.
* ``MAX_INPUT_BYTES`` (1 GiB): a file read (workload, HLO, profile, run folder), after gzip. The
  real captures in traces/real are under 1 MB compressed, 15 MB decompressed; a 6 GB gzip bomb is
  refused after reading 1 GiB, not after filling the memory.
* ``MAX_PROGRAM_OPS`` (250,000): ops of one device's program after unrolling HLO ``while`` loops.
  An 80-layer 70B step is 5,374 ops (0.2 s to simulate); 250,000 ops take about 10 s.
* ``MAX_LAYERS`` (2,048): decoder layers of a workload. The deepest published dense models have
  126 (Llama 3.1 405B); a layer compiles to ~70 ops, so 2,048 layers stay under ``MAX_PROGRAM_OPS``.
* ``MAX_SIZE`` (2^40, about 1.1e12): any one size of a workload (a model width, heads, vocabulary,
  sequence length, batch per device). The largest real ones are near 1e6 (a 128k vocabulary, a 1M
  token context); products of three such sizes times 2,048 layers stay far inside float64.
* ``MAX_STRAGGLER_FACTOR`` (1,000): a device 1,000 times slower than its peers is a dead device,
  not a straggler; an infinite factor made the step infinite.
* ``MAX_TIMELINE_ROWS`` (5,000,000): rows ``--all-devices`` may expand a timeline to (ops x chips).
* ``MAX_REQUESTS`` (100,000): requests of one ``tpusim serve`` run. The published serving benchmarks
  send 1,000 to 2,000 prompts (tests/data/measured-dev-2.yaml: ShareGPT, 2,000 for JetStream, 1,000
  for vLLM), x50; 10,000 requests simulate in about 5 s. A billion were accepted and ran out of memory.
* ``MAX_CONV_POSITIONS`` (2^24): output positions along one spatial dimension of an HLO
  convolution, whose valid (position, tap) pairs are counted exactly.
* ``MAX_FLASH_BLOCKS`` (2^20): query blocks of a flash kernel, a workload's (max_target_length /
  sa_block_q, and the backward's) or an HLO splash-attention kernel's, whose computed blocks are
  counted one query block at a time (``spec.block_fraction``, pure Python: about 0.4 s at the limit;
  at the default 512-blocks, sequences to 512M tokens).
"""

from __future__ import annotations

MAX_CHIPS = 2**20
MAX_SLICES = 4096
MAX_BYTES = 1e15
MAX_INPUT_BYTES = 2**30
MAX_PROGRAM_OPS = 250_000
MAX_LAYERS = 2048
MAX_SIZE = 2**40
MAX_STRAGGLER_FACTOR = 1000.0
MAX_TIMELINE_ROWS = 5_000_000
MAX_REQUESTS = 100_000
MAX_CONV_POSITIONS = 2**24
MAX_FLASH_BLOCKS = 2**20
