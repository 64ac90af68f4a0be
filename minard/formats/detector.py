"""Detector geometry (ZDAB_FORMAT.md: crate, card, channel)."""

#: 19 crates x 16 cards x 32 channels.
NCRATES = 19
NCARDS = 16
NCHANNELS = 32
NCHANNELS_TOTAL = NCRATES * NCARDS * NCHANNELS  # 9728
