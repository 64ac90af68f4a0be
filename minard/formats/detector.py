"""Detector geometry (ZDAB_FORMAT.md: crate, card, channel).

SNO+ PMT data uses crates 0-18 plus crate 19 (ZDAB_FORMAT.md section 6, word
H0: "real data uses 0-18, plus 19 in SNO+"), so every per-channel array of
the dispatch stream has 20 x 16 x 32 = 10240 entries, as the original
minard's maps.  The ORCA stream's XL3 crates are numbered 0-18
(ORCA_FORMAT.md, CMOS record w[1]); its decoder keeps that range
(:data:`NCRATES_XL3`) while its latest-value arrays are sized for the whole
detector.
"""

#: 20 crates (0-19) x 16 cards x 32 channels.
NCRATES = 20
NCARDS = 16
NCHANNELS = 32
NCHANNELS_TOTAL = NCRATES * NCARDS * NCHANNELS  # 10240
#: Crates an XL3 of the ORCA stream can report (ORCA_FORMAT.md: crate number 0-18).
NCRATES_XL3 = 19
#: Channels behind those XL3s (the ORCA simulator's detector).
NCHANNELS_XL3 = NCRATES_XL3 * NCARDS * NCHANNELS  # 9728
