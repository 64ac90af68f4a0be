"""minard: online monitoring for a SNO+-style neutrino detector.

Pure decoding and aggregation live in modules named for their concept
(``zdab``, ``pmt``, ``orca``, ``wire``); processes that talk to sockets and
Redis import them.
"""

__version__ = "0.1.0"

#: Detector geometry: 19 crates x 16 cards x 32 channels.
NCRATES = 19
NCARDS = 16
NCHANNELS = 32
NCHANNELS_TOTAL = NCRATES * NCARDS * NCHANNELS  # 9728
